"""Weight-only quantized linear layers for CPU decode (``EngineConfig.weight_quantization``).

Decode at small batch is bound by reading the weights: float32 SmolLM2-135M reads ~540 MB per
step. Two opt-in modes replace every decoder linear (qkv, o_proj, gate_up, down) and the LM
head; embeddings, norms, attention and the KV cache are unchanged:

- ``"int4"``: 4-bit integers with one bfloat16 scale and zero per group of ``INT4_GROUP_SIZE``
  input channels, through torch's packed CPU kernel ``_weight_int4pack_mm_for_cpu``; the LM
  head the same, with its top 64 logits per row recomputed from int8 weights
  (``RescoredInt4Head``): ~84 MB read per step.
- ``"int8"``: int8 with one bfloat16 scale per output row (symmetric), through
  ``_weight_int8pack_mm`` (~135 MB read per step).
- ``"w4a8"``: the int4 groups with float16 scale and minimum (llama.cpp's Q4_1 blocks) times
  activations quantized to int8 per block of 32 on every call (Q8_1), through scission's own
  C kernel (``kernels/w4a8.py``: integer dot products, 1.67x torch's packed int4 kernel over a
  decode step's linears at one row on an AVX2 CPU); the LM head the same, rescored as in int4.
  The same ~84 MB read per step as int4, in fewer instructions. Needs a C compiler at the
  first start (as graph mode does).

The int4 and int8 kernels take bfloat16 activations, w4a8's float32; results are cast back to
the model dtype. Batches of more than ``max_packed_rows`` rows (prefill chunks) multiply by a
dense copy of the same quantized weights in the model dtype in int4 and int8 mode, so those
trade memory (packed + dense copies) for decode speed; w4a8 runs them through its own
many-row kernel on the same codes (``W4A8Linear``). Kernel choice, group size and the LM
head's format were measured with ``bench/quant_kernels.py`` (``bench/README.md``).

Quantization is round-to-nearest (GPTQ/AWQ's "RTN" baseline, as in gpt-fast's int4 and int8
weight-only paths). int4 is asymmetric per group::

    scale = (max - min) / 15,  q = round((w - min) / scale) in [0, 15],  w ≈ q * scale + min

For a Q4_1 GGUF (llama.cpp quantizes each 32-weight block with exactly this min/max rule), the
dequantized weights requantize to the same 4-bit codes: the only new error is rounding the
float16 block scale and minimum to bfloat16, plus bfloat16 activations. int8 is
``scale = max|w| / 127, q = round(w / scale)`` per output row; it does not reproduce Q4_1's
blocks, so on that file it is the less accurate mode (tests/engine/test_quant_engine.py).
"""

from __future__ import annotations

import torch
from torch import nn

from scission.engine.config import WEIGHT_QUANTIZATION_CHOICES

INT4_GROUP_SIZE = 32
INT4_MAX_PACKED_ROWS = 64  # larger batches use the dequantized dense weights (Int4Linear)
INT8_MAX_PACKED_ROWS = 64  # the same for Int8Linear
# W4A8Linear (and the native decode step) run w4a8_gemm from this many rows on, w4a8_mm below
W4A8_GEMM_MIN_ROWS = 4
W4A8_MAX_PACKED_ROWS = W4A8_GEMM_MIN_ROWS - 1  # W4A8Linear.max_packed_rows: w4a8_mm up to here
_INT4_INNER_K_TILES = 1  # packing parameter of _convert_weight_to_int4pack_for_cpu
_INT4_N_MULTIPLE = 16  # the packed kernel needs out_features % 16 == 0


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit quantization along the input dimension.

    Args:
        weight: ``[out_features, in_features]`` float; ``in_features % group_size == 0``.
    Returns:
        ``(codes, scales, mins)``: codes ``[N, K]`` int32 in ``[0, 15]``; scales and mins
        ``[N, K // group_size]`` float32, with ``weight ≈ codes * scale + min`` per group.
    Raises:
        ValueError: ``in_features`` is not a multiple of ``group_size``.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)  # constant groups: any scale, codes 0
    codes = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15)
    return codes.to(torch.int32).reshape(n, k), scales, lo


def dequantize_int4_groupwise(codes: torch.Tensor, scales: torch.Tensor,
                              mins: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_int4_groupwise`` (float32 ``[N, K]``); the reference in tests."""
    n, k = codes.shape
    g = k // scales.shape[1]
    return (codes.float().reshape(n, -1, g) * scales[..., None] + mins[..., None]).reshape(n, k)


class _PackedLinear(nn.Module):
    """Shared forward: packed kernel for up to ``max_packed_rows`` rows, dense copy beyond.

    Subclasses set ``in_features``, ``out_features``, ``max_packed_rows``, the buffers
    ``dense_weight`` (``[N, K]``, model dtype) and ``bias`` (``[N]`` or None), and implement
    ``packed_args()`` (the kernel's weight tensors) and
    ``packed_mm(x [M, K] packed_input_dtype, *packed_args) -> [M, N]``, which may read only
    Python constants from ``self`` (graph mode traces it with the tensors as arguments).
    """

    in_features: int
    out_features: int
    max_packed_rows: int
    packed_input_dtype: torch.dtype = torch.bfloat16  # what packed_mm takes

    def packed_args(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def packed_mm(self, x: torch.Tensor, *packed: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def graph_args(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors ``graph_linear`` takes: the packed weights, the dense copy, the bias."""
        return (*self.packed_args(), self.dense_weight, self.bias)

    def graph_linear(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        """x ``[M, K]`` -> ``[M, N]`` in x's dtype from ``graph_args()``: a pure function of its
        arguments (engine/compile.py calls it inside compiled graphs)."""
        *packed, dense, bias = args
        if x.shape[0] > self.max_packed_rows:
            y = x @ dense.to(x.dtype).T
        else:
            y = self.packed_mm(x.to(self.packed_input_dtype), *packed).to(x.dtype)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in_features]``, any float dtype; returns ``[..., out_features]`` in
        ``x.dtype``. The 2-D decode case runs without reshapes (each is a call at batch 1)."""
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self.graph_linear(flat, *self.graph_args())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def decode_read_bytes(self) -> int:
        """Bytes a packed (decode) call reads for the weights: codes + scales (+ zeros)."""
        raise NotImplementedError


class Int4Linear(_PackedLinear):
    """``y = x @ W^T (+ bias)`` with ``W`` in 4-bit groups (see the module docstring).

    Input ``[..., in_features]`` of any float dtype; output the same dtype. Batches of more
    than ``max_packed_rows`` rows (prefill chunks) multiply by the dequantized weights in the
    input dtype instead: the packed kernel wins while reading weights dominates (decode) and
    loses to a dense GEMM once compute does (one [N=3072, K=576] matmul, one core: 2.4x faster
    at 1 row, 1.4x at 8, 0.9x at 32; the whole engine with packed weights only, 2 threads:
    decode 1.7x at batch 1, 1.1x at batch 32, prefill of 512 tokens 0.53x). Both paths use the
    same quantized weights.
    """

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE,
                 max_packed_rows: int = INT4_MAX_PACKED_ROWS) -> None:
        super().__init__()
        n, k = linear.weight.shape
        if n % _INT4_N_MULTIPLE:
            raise ValueError(f"out_features {n} is not a multiple of {_INT4_N_MULTIPLE}")
        codes, scales, mins = quantize_int4_groupwise(linear.weight, group_size)
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.max_packed_rows = max_packed_rows
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes, _INT4_INNER_K_TILES))
        # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale.
        sz = torch.stack([scales, mins + 8 * scales], dim=-1).to(torch.bfloat16)  # [N, K/g, 2]
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous())  # [K/g, N, 2]
        dense = (codes.float().reshape(n, -1, group_size) - 8) * sz[..., :1].float() \
            + sz[..., 1:].float()
        self.register_buffer("dense_weight", dense.reshape(n, k).to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def packed_args(self) -> tuple[torch.Tensor, ...]:
        return (self.packed, self.scales_and_zeros)

    def packed_mm(self, x: torch.Tensor, *packed: torch.Tensor) -> torch.Tensor:
        codes, scales_and_zeros = packed
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, codes, self.group_size,
                                                          scales_and_zeros)

    def decode_read_bytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scales_and_zeros)


class Int8Linear(_PackedLinear):
    """``y = x @ W^T (+ bias)`` with ``W`` int8, one bfloat16 scale per output row (symmetric
    RTN: ``scale = max|w| / 127``). Input ``[..., in_features]`` of any float dtype; output the
    same dtype. More than ``max_packed_rows`` rows multiply by the dequantized weights (the
    packed kernel's time grows ~linearly with rows: see ``bench/README.md``)."""

    def __init__(self, linear: nn.Linear, max_packed_rows: int = INT8_MAX_PACKED_ROWS) -> None:
        super().__init__()
        codes, scales = quantize_int8_per_channel(linear.weight)
        self.out_features, self.in_features = codes.shape
        self.max_packed_rows = max_packed_rows
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("dense_weight", (codes.float() * self.scales.float()[:, None])
                             .to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def packed_args(self) -> tuple[torch.Tensor, ...]:
        return (self.weight_int8, self.scales)

    def packed_mm(self, x: torch.Tensor, *packed: torch.Tensor) -> torch.Tensor:
        weight_int8, scales = packed
        return torch.ops.aten._weight_int8pack_mm(x, weight_int8, scales)

    def decode_read_bytes(self) -> int:
        return _nbytes(self.weight_int8) + _nbytes(self.scales)


class W4A8Linear(_PackedLinear):
    """``y = x @ W^T (+ bias)`` with ``W`` in Q4_1 blocks of 32 (float16 scale and minimum) and
    ``x`` quantized to int8 per block of 32 inside the kernel (``scission.kernels.w4a8``).

    The codes are ``quantize_int4_groupwise``'s (min/max round-to-nearest, as Q4_1): from a
    Q4_1 GGUF they are the file's own codes and scales. Input ``[..., in_features]`` of any
    float dtype (computed in float32); output the same dtype. Up to ``max_packed_rows`` rows
    (decode) run ``w4a8_mm`` on the 4-bit tiles; more rows (prefill chunks) run ``w4a8_gemm``
    on the same codes one per byte (~1.7x a float32 GEMM on an AVX2 CPU). Both quantize the
    input the same way and sum a row's blocks with the same float operations in the same
    order, so a row's output has the same bits however many rows share its step. Memory:
    ~1.6 bytes a weight (both layouts), against 4 for a float32 copy.

    Raises:
        ValueError: ``in_features`` is not a multiple of 32.
        KernelBuildError: the C kernel cannot be built here (no compiler).
    """

    def __init__(self, linear: nn.Linear, max_packed_rows: int = W4A8_MAX_PACKED_ROWS) -> None:
        super().__init__()
        from scission.kernels import w4a8

        w4a8.library()  # build (or load) the kernel now: fail at load time, not mid-request
        n, k = linear.weight.shape
        codes, scales, mins = quantize_int4_groupwise(linear.weight, w4a8.BLOCK_SIZE)
        scales, mins = scales.to(torch.float16), mins.to(torch.float16)
        self.in_features, self.out_features = k, n
        self.max_packed_rows = max_packed_rows
        self.register_buffer("blocks", w4a8.pack_q4_1(codes, scales, mins))
        tile_codes, tile_scales, tile_mins = w4a8.pack_q4_1_gemm(codes, scales, mins)
        self.register_buffer("tile_codes", tile_codes)
        self.register_buffer("tile_scales", tile_scales)
        self.register_buffer("tile_mins", tile_mins)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    # Two kernels and no dense copy: graph_args / graph_linear replace _PackedLinear's
    # packed_args / packed_mm / dense_weight contract.
    def graph_args(self) -> tuple[torch.Tensor | None, ...]:
        return (self.blocks, self.tile_codes, self.tile_scales, self.tile_mins, self.bias)

    def graph_linear(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        blocks, tile_codes, tile_scales, tile_mins, bias = args
        xf = x.to(torch.float32)
        if x.shape[0] > self.max_packed_rows:
            y = torch.ops.scission.w4a8_gemm(xf, tile_codes, tile_scales, tile_mins,
                                             self.out_features)
        else:
            y = torch.ops.scission.w4a8_mm(xf, blocks, self.out_features)
        y = y.to(x.dtype)
        return y if bias is None else y + bias

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``[N, K]`` weight the codes stand for (tests, references)."""
        g = self.in_features // 32
        t = self.tile_codes.reshape(-1, g, 8, 8, 4).permute(0, 3, 1, 2, 4)  # [T, n, G, s, 4]
        codes = t.reshape(-1, g, 32)[: self.out_features].float()
        scales = self.tile_scales.transpose(1, 2).reshape(-1, g)[: self.out_features]
        mins = self.tile_mins.transpose(1, 2).reshape(-1, g)[: self.out_features]
        return (codes * scales[..., None] + mins[..., None]).reshape(self.out_features, -1)

    def decode_read_bytes(self) -> int:
        return _nbytes(self.blocks)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int8 per output row.

    Args:
        weight: ``[out_features, in_features]`` float.
    Returns:
        ``(codes, scales)``: codes ``[N, K]`` int8 in ``[-127, 127]``, contiguous; scales
        ``[N]`` float32 with ``weight ≈ codes * scale[:, None]``.
    """
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # all-zero rows: any scale, codes 0
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return codes, scales


RESCORE_TOP_K = 64


class RescoredInt4Head(nn.Module):
    """LM head in two passes: 4-bit logits for the whole vocabulary (``Int4Linear``, groups of
    32), then the ``top_k`` highest of each row recomputed from int8 weights (one scale per
    row, as ``Int8Linear``) and written over the 4-bit values.

    Why: a plain 4-bit head reads 10 MB less per step than an int8 one and runs ~3x faster in
    the packed kernels (0.9 vs 2.7 ms per token, 2 threads), but triples the logits error
    against HF float32 and flips top-1 on 3 of 22 test prompts (bench/README.md). The
    candidates that decide greedy and top-k/top-p sampling get int8 precision back; the tail
    keeps 4-bit values (its probability mass is what differs from an int8 head).

    ``coarse``: the 4-bit pass's class, ``Int4Linear`` (default) or ``W4A8Linear`` (the
    ``"w4a8"`` mode; the rescored rows still use unquantized bfloat16 activations). With
    ``W4A8Linear`` and float32 inputs, both passes and the top-k run in one C call
    (``kernels.w4a8.rescored_head_with``, rows in parallel): ~0.5 ms less per step at batch 1
    than the torch ops (topk, gather, bmm, scatter).

    Input ``[..., in_features]`` any float dtype; output ``[..., out_features]`` same dtype.
    """

    def __init__(self, linear: nn.Linear, top_k: int = RESCORE_TOP_K,
                 coarse: type[_PackedLinear] | None = None) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("RescoredInt4Head has no bias")
        self.coarse = (coarse or Int4Linear)(linear)
        self.out_features, self.in_features = linear.weight.shape
        self.top_k = min(top_k, self.out_features)
        codes, scales = quantize_int8_per_channel(linear.weight)
        self.register_buffer("weight_int8", codes)  # [V, K] int8
        self.register_buffer("scales", scales.to(torch.bfloat16))  # [V]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        c = self.coarse
        if type(c) is W4A8Linear and flat.dtype == torch.float32 and c.bias is None:
            from scission.kernels import w4a8  # both passes in one C call

            logits = w4a8.rescored_head_with(
                w4a8.library(), flat.contiguous(), c.blocks, self.weight_int8, self.scales,
                self.top_k, (c.tile_codes, c.tile_scales, c.tile_mins), c.max_packed_rows + 1)
            return logits if x.dim() == 2 else logits.reshape(*x.shape[:-1], self.out_features)
        logits = c(flat)  # [M, V], x.dtype
        idx = logits.topk(self.top_k, dim=-1).indices  # [M, k]
        w = self.weight_int8[idx].float()  # [M, k, K]
        xq = flat.to(torch.bfloat16).float()[:, :, None]  # bf16 inputs, as the int8 kernel's
        fine = torch.bmm(w, xq)[..., 0] * self.scales[idx].float()  # [M, k]
        logits.scatter_(1, idx, fine.to(logits.dtype))
        return logits if x.dim() == 2 else logits.reshape(*x.shape[:-1], self.out_features)

    def decode_read_bytes(self) -> int:
        """The 4-bit pass; the rescored rows add ``top_k * in_features`` bytes per row."""
        return self.coarse.decode_read_bytes()


# The quantized modes (w8a8: engine/quant_w8a8.py).
WEIGHT_QUANTIZATIONS = tuple(m for m in WEIGHT_QUANTIZATION_CHOICES if m != "none")
# The LM head per mode: "int4" pairs the 4-bit decoder with the rescored head above.
_HEAD_MODE = {"int4": "int4-rescored", "int8": "int8", "w8a8": "w8a8-head",
              "w4a8": "w4a8-rescored"}
DECODER_LINEARS = ("qkv", "o_proj", "gate_up", "down")


def quantize_model(model: nn.Module, mode: str, layer_attrs: tuple[str, ...] = DECODER_LINEARS,
                   head_attr: str = "lm_head", head_mode: str | None = None) -> int:
    """Replace each decoder layer's ``layer_attrs`` linears and ``model.<head_attr>`` by
    ``Int4Linear`` (``mode="int4"``), ``Int8Linear`` (``"int8"``), ``W8A8Linear``
    (``"w8a8"``, engine/quant_w8a8.py) or ``W4A8Linear`` (``"w4a8"``), in place (CPU only).
    The LM head gets ``head_mode`` ("int4", "int8", "int4-rescored", "w8a8", "w8a8-head",
    "w8a8-rescored", "w4a8" or "w4a8-rescored"; default ``_HEAD_MODE[mode]``).
    Returns the bytes a decode step reads for those weights now (packed codes + scales; the
    dense prefill copies are not read in decode).

    Raises:
        ValueError: unknown ``mode``, the model is not on CPU, or a shape does not fit the
            packed kernels.
        KernelBuildError: ``"w4a8"`` and its C kernel cannot be built (no compiler).
    """
    if mode not in WEIGHT_QUANTIZATIONS:
        raise ValueError(f"weight quantization must be one of {WEIGHT_QUANTIZATIONS}, got {mode!r}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"{mode} weight quantization runs on CPU only")
    from scission.engine.quant_w8a8 import (  # cycle
        W8A8Head,
        W8A8Linear,
        W8A8RescoredHead,
        warn_if_slow_int_mm,
    )

    if mode == "w8a8" or (head_mode or "").startswith("w8a8"):
        warn_if_slow_int_mm()

    kinds = {"int4": Int4Linear, "int8": Int8Linear, "int4-rescored": RescoredInt4Head,
             "w8a8": W8A8Linear, "w8a8-head": W8A8Head, "w8a8-rescored": W8A8RescoredHead,
             "w4a8": W4A8Linear,
             "w4a8-rescored": lambda lin: RescoredInt4Head(lin, coarse=W4A8Linear)}
    read_bytes = 0
    for owner, attr in [(layer, a) for layer in model.layers for a in layer_attrs] \
            + [(model, head_attr)]:
        make = kinds[head_mode or _HEAD_MODE[mode]] if owner is model else kinds[mode]
        q = make(getattr(owner, attr))
        setattr(owner, attr, q)
        read_bytes += q.decode_read_bytes()
    return read_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
