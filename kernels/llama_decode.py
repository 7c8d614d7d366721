"""A whole Llama-family step in one C call: the w4a8 path's step loop.

``llama_decode.c`` runs every layer of a step (RMSNorm, the w4a8 linears of ``w4a8_gemv.c``,
neox RoPE, the paged K/V write, attention over each request's block table, SiLU-gated MLP,
residuals, the final norm) for a batch of requests, each one decode token or a prefill
chunk (``llama_forward_step``; no ``cu_seqlens_q``: one token each), float32 with 4-bit
(Q4_1) weights and int8 activations, and returns the final hidden states for the LM head.
A torch step at batch 1 spends ~5 ms in the linears' kernel and ~10 ms around it in op
dispatch, graph guards and Python (bench/README.md "Session 15"); one C call per step
leaves the kernels, as llama.cpp's graph executor does.

``LlamaDecodeStep`` holds the model's tensors (packed weights, norms, the cache views) and the
C struct of their addresses, built once; calling it runs a step. The float64 reference is
``kernels/reference.py: ref_llama_decode_step``.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from scission.kernels import w4a8
from scission.kernels.cpu_build import KernelBuildError, load_library

SOURCE = Path(__file__).with_name("llama_decode.c")
ABI = 2  # LLAMA_DECODE_ABI in llama_decode.c
LINEARS = ("qkv", "o_proj", "gate_up", "down")  # LIN_* in llama_decode.c, in order

__all__ = ["KernelBuildError", "LayerWeights", "LlamaDecodeStep", "library",
           "prefill_attention"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class _Weights(ctypes.Structure):
    """``llama_decode_weights`` in llama_decode.c (field order and types must match)."""

    _fields_ = [("abi", _I64), ("num_layers", _I64), ("hidden", _I64), ("num_heads", _I64),
                ("num_kv_heads", _I64), ("head_dim", _I64), ("intermediate", _I64),
                ("rms_norm_eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
                ("qkv", _P), ("qkv_bias", _P), ("o_proj", _P), ("gate_up", _P), ("down", _P),
                ("input_norm", _P), ("post_norm", _P), ("final_norm", _P),
                ("k_cache", _P), ("v_cache", _P), ("num_blocks", _I64), ("block_size", _I64),
                ("block_stride", _I64), ("slot_stride", _I64),
                ("tile_codes", _P * len(LINEARS)), ("tile_scales", _P * len(LINEARS)),
                ("tile_mins", _P * len(LINEARS)), ("gemm_min_rows", _I64)]


@functools.cache
def library(portable: bool = False) -> ctypes.CDLL:
    """The built step (cached per process); ``portable``: w4a8's plain-C path even on AVX2.

    Raises:
        KernelBuildError: no C compiler, the build failed, or the build's ABI differs.
    """
    flags = w4a8.PORTABLE_FLAGS if portable else w4a8.FLAGS
    lib = load_library(SOURCE, flags, deps=(w4a8.SOURCE,))
    lib.llama_forward_step.argtypes = [ctypes.POINTER(_Weights), _I64, _I64, _P, _P, _P, _P,
                                       _P, _I64, _I64, _P, _P, _P, ctypes.c_int]
    lib.llama_forward_step.restype = ctypes.c_int
    lib.llama_prefill_attention.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _P, _P, _I64,
                                            _I64, _I64, _I64, _P, _I64, ctypes.c_float, _P,
                                            ctypes.c_int]
    lib.llama_prefill_attention.restype = ctypes.c_int
    if lib.llama_decode_abi() != ABI:
        raise KernelBuildError(f"{SOURCE.name}: ABI {lib.llama_decode_abi()}, expected {ABI}")
    return lib


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer for ``LlamaDecodeStep``: packed weights are ``w4a8.pack_q4_1``'s
    ``[ceil(N / 4), K // 32 * 80]`` uint8; norms and bias float32 ``[N]``."""

    qkv: torch.Tensor  # [(H + 2 H_kv) D, hidden], rows q heads, k heads, v heads
    o_proj: torch.Tensor  # [hidden, H D]
    gate_up: torch.Tensor  # [2 intermediate, hidden]: gate rows, then up rows
    down: torch.Tensor  # [hidden, intermediate]
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    qkv_bias: torch.Tensor | None = None  # [(H + 2 H_kv) D]
    # The same four weights in w4a8.pack_q4_1_gemm's layout (codes, scales, mins), by name
    # ("qkv", "o_proj", "gate_up", "down"): needed when LlamaDecodeStep's gemm_min_rows > 0.
    tiles: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() \
            or t.device.type != "cpu":
        raise ValueError(f"{name}: expected contiguous CPU {dtype} {shape}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


def _packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return (-(-out_features // w4a8.TILE_ROWS),
            in_features // w4a8.BLOCK_SIZE * w4a8.TILE_BYTES)


class LlamaDecodeStep:
    """A decode step over fixed weights and KV cache (module docstring).

    Args:
        num_heads, num_kv_heads, head_dim, intermediate_size, rms_norm_eps: the model's.
        layers: per decoder layer, its weights (``LayerWeights``).
        final_norm: ``[hidden]`` float32.
        kv_caches: per layer ``(k_cache, v_cache)``, each float32
            ``[num_blocks, block_size, H_kv, D]`` with a slot's ``[H_kv, D]`` contiguous and
            the same strides in every layer (both ``KVLayout``s qualify).
        gemm_min_rows: steps of this many requests or more run the linears through
            ``w4a8_gemm`` (each layer's ``tiles``), fewer through ``w4a8_mm``; 0: never.
        portable: use the plain-C build (tests).
    Raises:
        ValueError: a tensor's dtype, shape or layout does not fit.
        KernelBuildError: the kernel cannot be built here.
    """

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, rms_norm_eps: float, layers: Sequence[LayerWeights],
                 final_norm: torch.Tensor,
                 kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 gemm_min_rows: int = 0, portable: bool = False) -> None:
        if not layers or len(layers) != len(kv_caches):
            raise ValueError(f"{len(layers)} layers but {len(kv_caches)} KV caches")
        hidden = final_norm.shape[0]
        qs, kvs, inter = num_heads * head_dim, num_kv_heads * head_dim, intermediate_size
        if num_kv_heads <= 0 or num_heads % num_kv_heads or head_dim % 2:
            raise ValueError(f"heads {num_heads}/{num_kv_heads}, head_dim {head_dim}: need "
                             f"num_heads % num_kv_heads == 0 and an even head_dim")
        for name, k in (("hidden_size", hidden), ("num_heads * head_dim", qs),
                        ("intermediate_size", inter)):
            if k % w4a8.BLOCK_SIZE:
                raise ValueError(f"{name} {k} is not a multiple of {w4a8.BLOCK_SIZE}")
        f32, u8 = torch.float32, torch.uint8
        _check("final_norm", final_norm, f32, (hidden,))
        k0 = kv_caches[0][0]
        cache_shape = tuple(k0.shape)
        if k0.dim() != 4 or cache_shape[2:] != (num_kv_heads, head_dim):
            raise ValueError(f"KV cache {cache_shape} is not [num_blocks, block_size, "
                             f"{num_kv_heads}, {head_dim}]")
        for i, (lw, (kc, vc)) in enumerate(zip(layers, kv_caches, strict=True)):
            _check(f"layer {i} qkv", lw.qkv, u8, _packed_shape(qs + 2 * kvs, hidden))
            _check(f"layer {i} o_proj", lw.o_proj, u8, _packed_shape(hidden, qs))
            _check(f"layer {i} gate_up", lw.gate_up, u8, _packed_shape(2 * inter, hidden))
            _check(f"layer {i} down", lw.down, u8, _packed_shape(hidden, inter))
            _check(f"layer {i} input_norm", lw.input_norm, f32, (hidden,))
            _check(f"layer {i} post_norm", lw.post_norm, f32, (hidden,))
            if lw.qkv_bias is not None:
                _check(f"layer {i} qkv_bias", lw.qkv_bias, f32, (qs + 2 * kvs,))
            if gemm_min_rows > 0:
                if lw.tiles is None or set(lw.tiles) != set(LINEARS):
                    raise ValueError(f"layer {i}: gemm_min_rows {gemm_min_rows} needs tiles "
                                     f"for {LINEARS}")
                for name, (n_out, k_in) in zip(LINEARS, ((qs + 2 * kvs, hidden), (hidden, qs),
                                                         (2 * inter, hidden), (hidden, inter)),
                                               strict=True):
                    codes, scales, mins = lw.tiles[name]
                    tiles = -(-n_out // w4a8.GEMM_TILE_ROWS)
                    groups = k_in // w4a8.BLOCK_SIZE
                    _check(f"layer {i} {name} tile codes", codes, u8,
                           (tiles, groups * w4a8.GEMM_BLOCK_BYTES))
                    _check(f"layer {i} {name} tile scales", scales, f32,
                           (tiles, groups, w4a8.GEMM_TILE_ROWS))
                    _check(f"layer {i} {name} tile mins", mins, f32,
                           (tiles, groups, w4a8.GEMM_TILE_ROWS))
            for c in (kc, vc):
                if c.dtype != f32 or tuple(c.shape) != cache_shape or c.stride() != k0.stride() \
                        or c.stride()[2:] != (head_dim, 1):
                    raise ValueError(f"layer {i} KV cache: expected float32 {cache_shape} with "
                                     f"strides {k0.stride()} ([H_kv, D] contiguous), got "
                                     f"{c.dtype} {tuple(c.shape)} {c.stride()}")
        self.lib = library(portable)
        self.hidden, self.half_dim = hidden, head_dim // 2
        self.num_blocks, self.block_size = cache_shape[:2]
        self._keep = (tuple(layers), final_norm, tuple(kv_caches))  # the addresses' owners

        def ptrs(tensors) -> ctypes.Array:
            return (ctypes.c_void_p * len(layers))(*(
                None if t is None else t.data_ptr() for t in tensors))

        self._arrays = {name: ptrs([getattr(lw, name) for lw in layers])
                        for name in ("qkv", "o_proj", "gate_up", "down", "input_norm",
                                     "post_norm")}
        self._arrays["k_cache"] = ptrs([kc for kc, _ in kv_caches])
        self._arrays["v_cache"] = ptrs([vc for _, vc in kv_caches])
        has_bias = any(lw.qkv_bias is not None for lw in layers)
        if has_bias:
            self._arrays["qkv_bias"] = ptrs([lw.qkv_bias for lw in layers])
        if gemm_min_rows > 0:
            for j, part in enumerate(("codes", "scales", "mins")):
                for name in LINEARS:
                    self._arrays[f"{name}_tile_{part}"] = ptrs([lw.tiles[name][j]
                                                                for lw in layers])
        addr = {k: ctypes.cast(v, ctypes.c_void_p) for k, v in self._arrays.items()}

        def per_linear(part: str) -> ctypes.Array:
            return (_P * len(LINEARS))(*(addr.get(f"{name}_tile_{part}") for name in LINEARS))

        self.gemm_min_rows = gemm_min_rows
        self._weights = _Weights(
            abi=ABI, num_layers=len(layers), hidden=hidden, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, intermediate=inter,
            rms_norm_eps=rms_norm_eps, attn_scale=head_dim ** -0.5,
            qkv=addr["qkv"], qkv_bias=addr.get("qkv_bias"), o_proj=addr["o_proj"],
            gate_up=addr["gate_up"], down=addr["down"], input_norm=addr["input_norm"],
            post_norm=addr["post_norm"], final_norm=final_norm.data_ptr(),
            k_cache=addr["k_cache"], v_cache=addr["v_cache"], num_blocks=self.num_blocks,
            block_size=self.block_size, block_stride=k0.stride(0), slot_stride=k0.stride(1),
            tile_codes=per_linear("codes"), tile_scales=per_linear("scales"),
            tile_mins=per_linear("mins"), gemm_min_rows=max(gemm_min_rows, 0))
        self._weights_ref = ctypes.byref(self._weights)

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor,
                 slot_mapping: torch.Tensor, num_threads: int | None = None,
                 cu_seqlens_q: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step over ``n`` tokens; writes this step's K/V into the cache.

        Without ``cu_seqlens_q`` a decode step: ``n`` requests, one token each. With it, any
        mix of decode tokens and prefill chunks (``llama_forward_step`` in llama_decode.c):
        request ``r`` owns token rows ``cu_seqlens_q[r] .. cu_seqlens_q[r + 1] - 1``, the
        last positions of its context, and a row's result does not depend on the others.

        Args:
            h: ``[n, hidden]`` float32, the tokens' input embeddings.
            cos, sin: ``[n, head_dim // 2]`` float32, each token's rotary row.
            block_table: ``[num_reqs, max_blocks]`` int32 (rows may be strided; columns
                contiguous).
            seq_lens: ``[num_reqs]`` int32, each context's length including this step's
                tokens.
            slot_mapping: ``[n]`` int64, the cache slot of each token's K/V (-1: not written).
            num_threads: OpenMP threads (default ``torch.get_num_threads()``).
            cu_seqlens_q: ``[num_reqs + 1]`` int32, 0 first and ``n`` last; None: one token
                per request.
        Returns: ``[n, hidden]`` float32, the final-normed hidden states.
        Raises:
            ValueError: a tensor does not fit, or a length, slot or block id is out of range
                (then nothing was written).
            MemoryError: scratch memory failed (the cache may hold part of the step's K/V).
        """
        n = h.shape[0]
        num_reqs = n if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
        f32 = torch.float32
        _check("h", h, f32, (n, self.hidden))
        _check("cos", cos, f32, (n, self.half_dim))
        _check("sin", sin, f32, (n, self.half_dim))
        _check("seq_lens", seq_lens, torch.int32, (num_reqs,))
        _check("slot_mapping", slot_mapping, torch.int64, (n,))
        if cu_seqlens_q is not None:
            _check("cu_seqlens_q", cu_seqlens_q, torch.int32, (num_reqs + 1,))
        if block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != num_reqs or block_table.stride(1) != 1:
            raise ValueError(f"block_table: expected int32 [{num_reqs}, max_blocks] with "
                             f"contiguous rows, got {block_table.dtype} "
                             f"{tuple(block_table.shape)}")
        out = torch.empty_like(h)
        rc = self.lib.llama_forward_step(
            self._weights_ref, n, num_reqs,
            None if cu_seqlens_q is None else cu_seqlens_q.data_ptr(), h.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), block_table.data_ptr(), block_table.shape[1],
            block_table.stride(0), seq_lens.data_ptr(), slot_mapping.data_ptr(), out.data_ptr(),
            num_threads or torch.get_num_threads())
        if rc == -1:
            raise MemoryError("llama_forward_step: no memory for its scratch buffers")
        if rc:
            raise ValueError(
                f"llama_forward_step: a query length, sequence length, slot or block id is out "
                f"of range (cu_seqlens_q "
                f"{None if cu_seqlens_q is None else cu_seqlens_q.tolist()}, seq_lens "
                f"{seq_lens.tolist()}, slots {slot_mapping.tolist()[:64]}, {self.num_blocks} "
                f"blocks of {self.block_size}, block_table width {block_table.shape[1]})")
        return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, kv_len: int, scale: float,
                      portable: bool = False) -> torch.Tensor:
    """Causal attention of a prefill chunk over its paged context in one C call
    (``llama_prefill_attention`` in llama_decode.c): query ``i`` sits at position
    ``kv_len - q_len + i`` and sees keys ``0 ..`` that position; the chunk's own K/V must
    already be in the cache. GQA by ``num_heads // num_kv_heads``. Float32 sums in another
    order than SDPA's (float64 reference: ``kernels/reference.py: ref_prefill_attention``, one request).

    Args:
        q: ``[q_len, num_heads, D]`` float32, CPU; heads and dims contiguous (token rows may
            be strided, e.g. a slice of the fused qkv output).
        k_cache, v_cache: one layer's ``[num_blocks, block_size, H_kv, D]`` float32, a slot's
            ``[H_kv, D]`` contiguous, both with the same strides (either ``KVLayout``).
        block_table: ``[>= ceil(kv_len / block_size)]`` int32, contiguous: the request's blocks.
        kv_len: context length including the chunk (``>= q_len``).
        scale: softmax scale (usually ``D ** -0.5``).
    Returns: ``[q_len, num_heads, D]`` float32, contiguous.
    Raises:
        ValueError: dtypes, layouts or shapes do not fit, or a block id is out of range.
        MemoryError: scratch memory failed.
    """
    q_len, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    if q.dtype != torch.float32 or q.stride()[1:] != (head_dim, 1) \
            or any(c.dtype != torch.float32 or c.dim() != 4 or c.stride() != k_cache.stride()
                   or c.shape != k_cache.shape or c.stride()[2:] != (head_dim, 1)
                   for c in (k_cache, v_cache)) \
            or k_cache.shape[3] != head_dim or block_table.dtype != torch.int32 \
            or block_table.dim() != 1 or not block_table.is_contiguous() \
            or block_table.shape[0] * block_size < kv_len:
        raise ValueError(f"prefill attention: q float32 [q_len, H, D] (rows contiguous), "
                         f"caches float32 [blocks, block_size, H_kv, D] with equal strides, "
                         f"block_table int32 [>= ceil(kv_len / block_size)]; got q {q.dtype} "
                         f"{tuple(q.shape)} {q.stride()}, k {k_cache.dtype} "
                         f"{tuple(k_cache.shape)} {k_cache.stride()}, v {v_cache.dtype} "
                         f"{tuple(v_cache.shape)} {v_cache.stride()}, block_table "
                         f"{block_table.dtype} {tuple(block_table.shape)}, kv_len {kv_len}")
    out = q.new_empty((q_len, num_heads, head_dim))
    rc = library(portable).llama_prefill_attention(
        q.data_ptr(), q_len, q.stride(0), num_heads, num_kv_heads, head_dim,
        k_cache.data_ptr(), v_cache.data_ptr(), num_blocks, block_size, k_cache.stride(0),
        k_cache.stride(1), block_table.data_ptr(), kv_len, scale, out.data_ptr(),
        torch.get_num_threads())
    if rc == -1:
        raise MemoryError("prefill attention: no memory for its scratch")
    if rc:
        raise ValueError(f"prefill attention: q_len {q_len} / kv_len {kv_len} / heads "
                         f"{num_heads}/{num_kv_heads} / D {head_dim} out of range, or a block "
                         f"id outside [0, {num_blocks}) in {block_table.tolist()}")
    return out
