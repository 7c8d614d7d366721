"""4-bit weights x 8-bit activations: the CPU kernel behind ``weight_quantization="w4a8"``.

llama.cpp's Q4_1 x Q8_1 scheme (``ggml_vec_dot_q4_1_q8_1`` in ggml-quants.c), in C
(``w4a8_gemv.c``, built once per machine by ``cpu_build``):

- weights: blocks of 32 along the input dimension, each an fp16 scale ``d`` and minimum ``m``
  and 32 codes ``q`` in ``[0, 15]`` (``w = q * d + m``); 20 bytes per block (5 bits a weight),
  stored in tiles of 4 output rows (``pack_q4_1``);
- activations: quantized by the kernel on every call, per row and block of 32, to int8
  ``a = round(x * 127 / max|x|)`` with scale ``e = max|x| / 127`` (round half to even);
- ``y[m, n] = sum_g d[n,g] e[m,g] (q[n,g] . a[m,g]) + m[n,g] e[m,g] sum(a[m,g])``: integer
  dot products (AVX2 ``vpmaddubsw``), one float multiply-add per block.

Decode at batch 1 is bound by the weight bytes a step reads; torch's packed int4 kernel
(``_weight_int4pack_mm_for_cpu``) converts the codes to bfloat16 and multiplies in floating
point, which on a 2-core AVX2 CPU is compute-bound at ~8 GB/s. This kernel runs a decode
step's 121 linears 1.67x faster there (1.2-2.1x per shape; ``bench/quant_kernels.py``,
bench/README.md "Session 15"). The int8 activations are the
accuracy cost, as in llama.cpp (tests/engine/test_quant_engine.py states it against HF).

Many rows (prefill chunks) take ``w4a8_gemm``: the same arithmetic (only the float sums run in
another order) on the codes stored one per byte in tiles of 8 output rows
(``pack_q4_1_gemm``), so one ``vpmaddubsw`` multiplies 8 weight rows by 4 activations and the
products add up in int16 across a block: ~1.7x a float32 GEMM (oneDNN) on the same CPU, where
the Q4_1 x Q8_1 dot per row is ~2x slower than it (bench/README.md "Session 17").

``w4a8_mm`` and ``w4a8_gemm`` are the ops ``scission::w4a8_mm`` / ``scission::w4a8_gemm``, so
graph mode (engine/compile.py) calls them between inductor's fused kernels; ``ref_w4a8_mm``
(kernels/reference.py) is the float64 reference of both.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from scission.kernels.cpu_build import KernelBuildError, load_library

BLOCK_SIZE = 32  # weights per block
TILE_ROWS = 4  # output rows stored together (w4a8_gemv.c: tile_q4_1)
TILE_BYTES = 80  # per tile and block: fp16 d[4], fp16 m[4], 4 x 16 bytes of codes
GEMM_TILE_ROWS = 8  # output rows per tile of the many-row layout (w4a8_gemm)
GEMM_BLOCK_BYTES = 256  # per tile and block: 8 rows x 32 codes, one per byte
SOURCE = Path(__file__).with_name("w4a8_gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11")
PORTABLE_FLAGS = (*FLAGS, "-DSCISSION_W4A8_PORTABLE")  # the plain-C path, for tests

__all__ = ["BLOCK_SIZE", "GEMM_TILE_ROWS", "TILE_BYTES", "TILE_ROWS", "KernelBuildError",
           "library", "pack_q4_1", "pack_q4_1_gemm", "rescored_head_with", "w4a8_gemm",
           "w4a8_gemm_with", "w4a8_mm", "w4a8_mm_with"]


@functools.cache
def library(portable: bool = False) -> ctypes.CDLL:
    """The built kernel (cached per process). ``portable``: the plain-C path even on AVX2.

    Raises:
        KernelBuildError: no C compiler, or the build failed.
    """
    lib = load_library(SOURCE, PORTABLE_FLAGS if portable else FLAGS)
    lib.w4a8_mm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_int]
    lib.w4a8_mm.restype = ctypes.c_int
    lib.w4a8_rescored_head.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_int]
    lib.w4a8_rescored_head.restype = ctypes.c_int
    lib.w4a8_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.w4a8_gemm.restype = ctypes.c_int
    if lib.w4a8_gemm_tile_rows() != GEMM_TILE_ROWS:
        raise KernelBuildError(f"{SOURCE.name}: w4a8_gemm tiles of {lib.w4a8_gemm_tile_rows()} "
                               f"rows, expected {GEMM_TILE_ROWS}")
    if (lib.w4a8_tile_bytes(), lib.w4a8_tile_rows()) != (TILE_BYTES, TILE_ROWS):
        raise KernelBuildError(f"{SOURCE.name}: tiles of {lib.w4a8_tile_rows()} rows and "
                               f"{lib.w4a8_tile_bytes()} bytes, expected {TILE_ROWS} and "
                               f"{TILE_BYTES}")
    return lib


def _check_q4_1(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> int:
    """Blocks per row ``K // 32`` of a ``[N, K]`` weight's codes and ``[N, K // 32]`` scales
    and minimums; raises ``ValueError`` when ``K % 32``, the shapes disagree or a code is
    outside ``[0, 15]``."""
    n, k = codes.shape
    if k % BLOCK_SIZE:
        raise ValueError(f"in_features {k} is not a multiple of {BLOCK_SIZE}")
    g = k // BLOCK_SIZE
    if scales.shape != (n, g) or mins.shape != (n, g):
        raise ValueError(f"scales {tuple(scales.shape)} / mins {tuple(mins.shape)} != {(n, g)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("4-bit codes must be in [0, 15]")
    return g


def pack_q4_1(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The kernel's weight layout from 4-bit codes and per-block scales and minimums.

    Args:
        codes: ``[N, K]`` integers in ``[0, 15]``; ``K % 32 == 0``.
        scales, mins: ``[N, K // 32]`` float; stored as float16 (``w = q * d + m``).
    Returns:
        ``[ceil(N / 4), K // 32 * 80]`` uint8, contiguous: tiles of 4 rows; per tile and block
        the 4 fp16 scales, the 4 fp16 minimums, then each row's 16 bytes
        ``q[j] | q[j + 16] << 4``. Rows past ``N`` are zeros. 20 bytes per row and block, as
        llama.cpp's ``block_q4_1``.
    Raises:
        ValueError: shapes disagree, ``K`` is not a multiple of 32, or a code is outside
            ``[0, 15]``.
    """
    n, k = codes.shape
    g = _check_q4_1(codes, scales, mins)
    tiles = -(-n // TILE_ROWS)
    pad = tiles * TILE_ROWS - n
    q = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad)).reshape(
        tiles, TILE_ROWS, g, BLOCK_SIZE)
    qs = (q[..., :16] | (q[..., 16:] << 4)).transpose(1, 2)  # [T, G, 4, 16]

    def halves(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [T, G, 8] bytes
        t = torch.nn.functional.pad(t.to(torch.float16), (0, 0, 0, pad))
        return t.reshape(tiles, TILE_ROWS, g).transpose(1, 2).contiguous().view(torch.uint8)

    parts = [halves(scales), halves(mins), qs.reshape(tiles, g, TILE_ROWS * 16)]
    return torch.cat(parts, dim=-1).reshape(tiles, g * TILE_BYTES).contiguous()


def pack_q4_1_gemm(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w4a8_gemm``'s weight layout (many rows) from 4-bit codes and per-block scales/minimums.

    Args:
        codes: ``[N, K]`` integers in ``[0, 15]``; ``K % 32 == 0``.
        scales, mins: ``[N, K // 32]`` float (pass float16 values to match ``pack_q4_1``).
    Returns:
        ``(tile_codes, tile_scales, tile_mins)``: ``[ceil(N / 8), K // 32 * 256]`` uint8, one
        code per byte, per tile and block 8 steps of 8 rows x 4 consecutive codes (step ``s``,
        row ``n``: ``q[n, 32 g + 4 s .. 4 s + 3]``); scales and minimums
        ``[ceil(N / 8), K // 32, 8]`` float32. Rows past ``N`` are zeros. All contiguous.
    Raises:
        ValueError: shapes disagree, ``K`` is not a multiple of 32, or a code is outside
            ``[0, 15]``.
    """
    n, k = codes.shape
    g = _check_q4_1(codes, scales, mins)
    tiles = -(-n // GEMM_TILE_ROWS)
    pad = tiles * GEMM_TILE_ROWS - n
    q = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    q = q.reshape(tiles, GEMM_TILE_ROWS, g, 8, 4).permute(0, 2, 3, 1, 4)  # [T, G, s, n, 4]

    def per_tile(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [T, G, 8] float32
        t = torch.nn.functional.pad(t.float(), (0, 0, 0, pad))
        return t.reshape(tiles, GEMM_TILE_ROWS, g).transpose(1, 2).contiguous()

    return q.reshape(tiles, g * GEMM_BLOCK_BYTES).contiguous(), per_tile(scales), per_tile(mins)


def w4a8_gemm_with(lib: ctypes.CDLL, x: torch.Tensor, tile_codes: torch.Tensor,
                   tile_scales: torch.Tensor, tile_mins: torch.Tensor,
                   out_features: int) -> torch.Tensor:
    """``x [M, K]`` float32 times the weight in ``pack_q4_1_gemm``'s layout ->
    ``[M, out_features]`` float32, through ``lib`` (``library()``); x is quantized per row and
    block of 32 exactly as ``w4a8_mm_with`` does, so both give the same products up to the
    order of float additions.

    Raises:
        ValueError: wrong dtypes, layouts or shapes.
        MemoryError: the kernel could not allocate its scratch.
    """
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() \
            or tile_codes.dtype != torch.uint8 or tile_codes.dim() != 2 \
            or not tile_codes.is_contiguous() \
            or any(t.dtype != torch.float32 or not t.is_contiguous()
                   or t.shape != (tile_codes.shape[0], x.shape[1] // BLOCK_SIZE, GEMM_TILE_ROWS)
                   for t in (tile_scales, tile_mins)):
        raise ValueError(f"w4a8_gemm: x must be contiguous float32 [M, K], tile_codes uint8 "
                         f"[T, K // 32 * 256], tile_scales / tile_mins float32 [T, K // 32, 8]; "
                         f"got {x.dtype} {tuple(x.shape)}, {tile_codes.dtype} "
                         f"{tuple(tile_codes.shape)}, {tile_scales.dtype} "
                         f"{tuple(tile_scales.shape)}, {tile_mins.dtype} "
                         f"{tuple(tile_mins.shape)}")
    m, k = x.shape
    y = x.new_empty((m, out_features))
    rc = lib.w4a8_gemm(x.data_ptr(), m, k, tile_codes.data_ptr(), tile_codes.shape[0],
                       tile_codes.shape[1], tile_scales.data_ptr(), tile_mins.data_ptr(),
                       out_features, y.data_ptr(), torch.get_num_threads())
    if rc:
        if rc == -1:
            raise MemoryError("w4a8_gemm: no memory for the quantized activations")
        raise ValueError(f"w4a8_gemm: x {tuple(x.shape)} does not fit tile_codes "
                         f"{tuple(tile_codes.shape)} for {out_features} outputs (K a multiple "
                         f"of {BLOCK_SIZE}, tile_codes [ceil(N / {GEMM_TILE_ROWS}), K // "
                         f"{BLOCK_SIZE} * {GEMM_BLOCK_BYTES}])")
    return y


def w4a8_mm_with(lib: ctypes.CDLL, x: torch.Tensor, blocks: torch.Tensor,
                 out_features: int) -> torch.Tensor:
    """``x [M, K]`` float32 times the packed weight ``blocks`` (``pack_q4_1`` of an
    ``[out_features, K]`` weight) -> ``[M, out_features]`` float32, through ``lib``
    (``library()``). Kept to a few microseconds of Python: the kernel checks the shapes.

    Raises:
        ValueError: wrong dtypes, layouts or shapes.
        MemoryError: the kernel could not allocate its scratch.
    """
    if x.dtype != torch.float32 or blocks.dtype != torch.uint8 or x.dim() != 2 \
            or blocks.dim() != 2 or not x.is_contiguous() or not blocks.is_contiguous():
        raise ValueError(f"w4a8_mm: x must be contiguous float32 [M, K] and blocks contiguous "
                         f"uint8 [T, B], got {x.dtype} {tuple(x.shape)} and {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    m, k = x.shape
    y = x.new_empty((m, out_features))
    rc = lib.w4a8_mm(x.data_ptr(), m, k, blocks.data_ptr(), blocks.shape[0], blocks.shape[1],
                     out_features, y.data_ptr(), torch.get_num_threads())
    if rc:
        if rc == -1:
            raise MemoryError("w4a8_mm: no memory for the quantized activations")
        raise ValueError(f"w4a8_mm: x {tuple(x.shape)} does not fit blocks "
                         f"{tuple(blocks.shape)} for {out_features} outputs (K a multiple of "
                         f"{BLOCK_SIZE}, blocks [ceil(N / {TILE_ROWS}), K // {BLOCK_SIZE} * "
                         f"{TILE_BYTES}])")
    return y


def rescored_head_with(lib: ctypes.CDLL, x: torch.Tensor, blocks: torch.Tensor,
                       weight_int8: torch.Tensor, scales: torch.Tensor, top_k: int,
                       tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                       gemm_min_rows: int = 0) -> torch.Tensor:
    """A rescored LM head in one C call: ``w4a8_mm_with(lib, x, blocks, V)`` (or, with
    ``tiles`` and at least ``gemm_min_rows`` rows, ``w4a8_gemm_with``: the same bits), then in
    each row the ``top_k`` largest logits recomputed as ``(weight_int8[v] . bf16(x)) *
    scales[v]`` (float32 sums of the int8 weights times x rounded to bfloat16), as
    ``engine/quant.py: RescoredInt4Head`` computes them in torch.

    Args:
        x: ``[M, K]`` float32, contiguous.
        blocks: ``pack_q4_1`` of the ``[V, K]`` 4-bit weight.
        weight_int8: ``[V, K]`` int8, contiguous; scales: ``[V]`` bfloat16.
        top_k: rows rescored per row of x, ``0 <= top_k <= V``.
        tiles: ``pack_q4_1_gemm`` of the same weight, or None (``w4a8_mm`` only).
        gemm_min_rows: with ``tiles``, from this many rows on the logits are ``w4a8_gemm``'s.
    Returns: ``[M, V]`` float32 logits.
    Raises:
        ValueError: dtypes, layouts or shapes do not fit.
        MemoryError: the kernel could not allocate its scratch.
    """
    v = weight_int8.shape[0] if weight_int8.dim() == 2 else -1
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() \
            or weight_int8.dtype != torch.int8 or weight_int8.shape != (v, x.shape[1]) \
            or not weight_int8.is_contiguous() or scales.dtype != torch.bfloat16 \
            or scales.shape != (v,) or not scales.is_contiguous() \
            or blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        raise ValueError(f"rescored head: x float32 [M, K], weight_int8 int8 [V, K], scales "
                         f"bfloat16 [V], blocks uint8 (all contiguous); got {x.dtype} "
                         f"{tuple(x.shape)}, {weight_int8.dtype} {tuple(weight_int8.shape)}, "
                         f"{scales.dtype} {tuple(scales.shape)}, {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    m, k = x.shape
    if tiles is not None and any(
            not t.is_contiguous() or t.dtype != dt or t.shape[0] != -(-v // GEMM_TILE_ROWS)
            for t, dt in zip(tiles, (torch.uint8, torch.float32, torch.float32), strict=True)):
        raise ValueError(f"rescored head: tiles must be pack_q4_1_gemm of the [{v}, {k}] "
                         f"weight, got {[(t.dtype, tuple(t.shape)) for t in tiles]}")
    codes, tile_scales, tile_mins = (t.data_ptr() for t in tiles) if tiles else (None,) * 3
    logits = x.new_empty((m, v))
    rc = lib.w4a8_rescored_head(x.data_ptr(), m, k, blocks.data_ptr(), blocks.shape[0],
                                blocks.shape[1], codes, tile_scales, tile_mins,
                                gemm_min_rows if tiles else 0, v, weight_int8.data_ptr(),
                                scales.data_ptr(), top_k, logits.data_ptr(),
                                torch.get_num_threads())
    if rc == -1:
        raise MemoryError("rescored head: no memory for its scratch")
    if rc:
        raise ValueError(f"rescored head: blocks {tuple(blocks.shape)} do not fit x "
                         f"{tuple(x.shape)} and {v} outputs, or top_k {top_k} is not in "
                         f"[0, {v}]")
    return logits


# The op is registered with torch.library.Library rather than torch.library.custom_op: the
# latter's Python wrappers cost ~20 us a call against ~5 us here (bench/README.md), and a
# decode step makes 121 of these calls.
_LIBRARY = torch.library.Library("scission", "FRAGMENT")
_LIBRARY.define("w4a8_mm(Tensor x, Tensor blocks, int out_features) -> Tensor")
_LIBRARY.define("w4a8_gemm(Tensor x, Tensor tile_codes, Tensor tile_scales, Tensor tile_mins, "
                "int out_features) -> Tensor")


def w4a8_mm(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """``y = x @ W^T`` with ``W`` in Q4_1 ``blocks`` and ``x`` quantized to int8 per block of 32
    (module docstring); the op ``torch.ops.scission.w4a8_mm``.

    Args:
        x: ``[M, K]`` float32, CPU, contiguous.
        blocks: ``[ceil(N / 4), K // 32 * 80]`` uint8 (``pack_q4_1``).
        out_features: ``N``.
    Returns: ``[M, N]`` float32.
    Raises:
        ValueError: dtypes or shapes do not fit.
        KernelBuildError: the kernel cannot be built here.
    """
    return w4a8_mm_with(library(), x, blocks, out_features)


_LIBRARY.impl("w4a8_mm", w4a8_mm, "CPU")


@torch.library.register_fake("scission::w4a8_mm", lib=_LIBRARY)
def _(x, blocks, out_features):
    return x.new_empty(x.shape[0], out_features)


def w4a8_gemm(x: torch.Tensor, tile_codes: torch.Tensor, tile_scales: torch.Tensor,
              tile_mins: torch.Tensor, out_features: int) -> torch.Tensor:
    """``w4a8_mm``'s product for many rows, from ``pack_q4_1_gemm``'s layout; the op
    ``torch.ops.scission.w4a8_gemm``.

    Args:
        x: ``[M, K]`` float32, CPU, contiguous.
        tile_codes, tile_scales, tile_mins: ``pack_q4_1_gemm`` of the ``[out_features, K]``
            weight.
        out_features: ``N``.
    Returns: ``[M, N]`` float32.
    Raises:
        ValueError: dtypes or shapes do not fit.
        KernelBuildError: the kernel cannot be built here.
    """
    return w4a8_gemm_with(library(), x, tile_codes, tile_scales, tile_mins, out_features)


_LIBRARY.impl("w4a8_gemm", w4a8_gemm, "CPU")


@torch.library.register_fake("scission::w4a8_gemm", lib=_LIBRARY)
def _(x, tile_codes, tile_scales, tile_mins, out_features):
    return x.new_empty(x.shape[0], out_features)
