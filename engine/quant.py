"""Weight-only quantized linear layers for CPU decode (``EngineConfig.weight_quantization``).

Decode at small batch is bound by reading the weights: float32 SmolLM2-135M reads ~540 MB per
step. ``"int4"`` keeps every decoder linear (qkv, o_proj, gate_up, down) as 4-bit integers with
one bfloat16 scale and zero per group of ``INT4_GROUP_SIZE`` input channels, and the LM head as
int8 with one bfloat16 scale per output row; the matmuls run in torch's packed CPU kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) with bfloat16 activations, and the
results are cast back to the model dtype. Embeddings, norms, attention and the KV cache are
unchanged. Prefill-sized batches multiply by a dense copy of the same quantized weights (see
``Int4Linear``), so the mode trades memory (packed + dense copies) for decode speed.

Quantization is round-to-nearest per group, asymmetric (GPTQ/AWQ's "RTN" baseline, as in
gpt-fast's int4 weight-only path)::

    scale = (max - min) / 15,  q = round((w - min) / scale) in [0, 15],  w ≈ q * scale + min

For a Q4_1 GGUF (llama.cpp quantizes each 32-weight block with exactly this min/max rule), the
dequantized weights requantize to the same 4-bit codes: the only new error is rounding the
float16 block scale and minimum to bfloat16, plus bfloat16 activations.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUP_SIZE = 32
INT4_MAX_PACKED_ROWS = 64  # larger batches use the dequantized dense weights (Int4Linear)
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


class Int4Linear(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > self.max_packed_rows:
            y = flat @ self.dense_weight.to(x.dtype).T
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
            ).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """``y = x @ W^T`` with ``W`` int8, one bfloat16 scale per output row (symmetric RTN)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias")
        w = linear.weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_model_int4(model: nn.Module, layer_attrs: tuple[str, ...] = ("qkv", "o_proj",
                                                                          "gate_up", "down"),
                        head_attr: str = "lm_head") -> int:
    """Replace each decoder layer's linears by ``Int4Linear`` and the LM head by
    ``Int8Linear``, in place (CPU only). Returns the bytes a decode step reads for those
    weights now (packed codes + scales; the dense prefill copies are not read in decode).

    Raises:
        ValueError: the model is not on CPU, or a shape does not fit the packed kernels.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int4 weight quantization runs on CPU only")
    read_bytes = 0
    for layer in model.layers:
        for attr in layer_attrs:
            q = Int4Linear(getattr(layer, attr))
            setattr(layer, attr, q)
            read_bytes += _nbytes(q.packed) + _nbytes(q.scales_and_zeros)
    head = Int8Linear(getattr(model, head_attr))
    setattr(model, head_attr, head)
    return read_bytes + _nbytes(head.weight_int8) + _nbytes(head.scales)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
