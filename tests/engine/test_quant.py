"""Weight-only int4/int8 linears and w4a8 (int4 x int8 activations) against float64 references
of their dequantized weights, and ``quantize_model`` on a small stand-in model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scission.engine.quant import (
    Int4Linear,
    Int8Linear,
    RescoredInt4Head,
    W4A8Linear,
    dequantize_int4_groupwise,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_model,
)
from scission.kernels.reference import ref_w4a8_mm

# bfloat16 activations (8 mantissa bits) bound the error: ‖y − ref‖ / ‖ref‖ ≤ 1e-2.
REL_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def q4_1_like(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights built as llama.cpp's Q4_1 stores them: code * d + m per 32-block, every block
    using codes 0 and 15 (Q4_1 maps each block's min and max to them)."""
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    codes[:, ::32], codes[:, 1::32] = 0, 15
    d = torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3
    m = -torch.rand(n, k // 32, generator=gen) * 0.1
    w = (codes.float().reshape(n, -1, 32) * d[..., None] + m[..., None]).reshape(n, k)
    return codes, w


def test_q4_1_weights_requantize_to_their_own_codes():
    gen = torch.Generator().manual_seed(1)
    codes, w = q4_1_like(48, 96, gen)
    got, scales, mins = quantize_int4_groupwise(w)
    assert torch.equal(got, codes)
    assert torch.allclose(dequantize_int4_groupwise(got, scales, mins), w, atol=1e-6)


def test_quantization_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=gen)
    codes, scales, mins = quantize_int4_groupwise(w)
    assert codes.min() >= 0 and codes.max() <= 15
    step = scales.repeat_interleave(32, dim=1)
    assert ((dequantize_int4_groupwise(codes, scales, mins) - w).abs() <= step / 2 + 1e-6).all()


def test_rejects_in_features_not_multiple_of_group():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4_groupwise(torch.randn(16, 40))


@pytest.mark.parametrize("batch", [1, 5, 33, 80])  # 80 > INT4_MAX_PACKED_ROWS: dense path
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_float64_reference(batch, bias, dtype):
    gen = torch.Generator().manual_seed(batch * 7 + bias)
    dense = nn.Linear(96, 48, bias=bias)
    _, w = q4_1_like(48, 96, gen)
    with torch.no_grad():
        dense.weight.copy_(w)
    layer = Int4Linear(dense)
    x = torch.randn(batch, 96, generator=gen).to(dtype)
    sz = layer.scales_and_zeros.double()  # [K/32, N, 2] as the kernel reads them (bfloat16)
    scales, zeros = sz[..., 0].T, sz[..., 1].T
    codes, _, _ = quantize_int4_groupwise(w)
    w_ref = ((codes.double().reshape(48, -1, 32) - 8) * scales[..., None]
             + zeros[..., None]).reshape(48, 96)
    ref = x.double() @ w_ref.T + (dense.bias.double() if bias else 0)
    out = torch.full((batch, 48), float("nan"), dtype=dtype)
    out.copy_(layer(x))
    assert out.dtype == dtype and out.shape == (batch, 48)
    assert rel_err(out, ref) < REL_TOL


def test_int8_linear_matches_float64_reference():
    gen = torch.Generator().manual_seed(3)
    dense = nn.Linear(64, 80, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(80, 64, generator=gen))
    layer = Int8Linear(dense)
    x = torch.randn(7, 64, generator=gen)
    w_ref = layer.weight_int8.double() * layer.scales.double()[:, None]
    assert rel_err(layer(x), x.double() @ w_ref.T) < REL_TOL
    assert rel_err(layer(x), x.double() @ dense.weight.double().T) < 2 * REL_TOL


@pytest.mark.parametrize("batch", [1, 5, 80])  # 80 > W4A8_MAX_PACKED_ROWS: w4a8_gemm
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a8_linear_matches_float64_reference(batch, bias, dtype):
    """Both kernels (up to 64 rows w4a8_mm, beyond w4a8_gemm): int8 activations per block of
    32 times the Q4_1 codes (``ref_w4a8_mm``)."""
    gen = torch.Generator().manual_seed(batch * 3 + bias)
    dense = nn.Linear(96, 44, bias=bias)  # 44 rows: 11 tiles of 4
    _, w = q4_1_like(44, 96, gen)
    with torch.no_grad():
        dense.weight.copy_(w)
    dense = dense.to(dtype)  # a model's linears are in its dtype
    layer = W4A8Linear(dense)
    x = torch.randn(batch, 96, generator=gen).to(dtype)
    codes, scales, mins = quantize_int4_groupwise(dense.weight)
    b = dense.bias.double() if bias else 0
    ref = ref_w4a8_mm(x.float(), codes, scales, mins) + b
    out = layer(x)
    assert out.dtype == dtype and out.shape == (batch, 44)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else REL_TOL)
    # int8 activations: still close to the float product of the same 4-bit weights
    w_ref = (codes.double().reshape(44, -1, 32) * scales.half().double()[..., None]
             + mins.half().double()[..., None]).reshape(44, 96)
    assert torch.equal(layer.dequantized_weight().double(), w_ref)
    assert rel_err(out, x.double() @ w_ref.T + b) < 2e-2


def test_out_features_must_fit_the_packed_kernel():
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear(nn.Linear(64, 40))


@pytest.mark.parametrize("batch", [1, 9, 80])  # 80 > INT8_MAX_PACKED_ROWS: dense path
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_with_bias_and_dense_path(batch, bias, dtype):
    gen = torch.Generator().manual_seed(batch * 5 + bias)
    dense = nn.Linear(96, 64, bias=bias, dtype=dtype)  # a model's linears are in its dtype
    layer = Int8Linear(dense)
    x = torch.randn(2, batch, 96, generator=gen).to(dtype)  # 3-D input: reshaped and back
    w_ref = layer.weight_int8.double() * layer.scales.double()[:, None]
    ref = x.double() @ w_ref.T + (dense.bias.double() if bias else 0)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, batch, 64)
    assert rel_err(out, ref) < REL_TOL


def test_int8_per_channel_error_is_at_most_half_a_step():
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(4))
    w[3] = 0  # an all-zero row quantizes to zeros
    codes, scales = quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert (codes[3] == 0).all()
    assert ((codes.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


class _TinyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o_proj = nn.Linear(64, 96, bias=True), nn.Linear(64, 64, bias=False)
        self.gate_up, self.down = nn.Linear(64, 128, bias=False), nn.Linear(64, 64, bias=False)


class _TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_TinyLayer(), _TinyLayer()])
        self.lm_head = nn.Linear(64, 160, bias=False)


@pytest.mark.parametrize("mode", ["int4", "int8", "w4a8"])
def test_quantize_model_replaces_every_linear_and_counts_decode_bytes(mode):
    model = _TinyModel()
    read_bytes = quantize_model(model, mode)
    decoder_type = {"int4": Int4Linear, "int8": Int8Linear, "w4a8": W4A8Linear}[mode]
    for layer in model.layers:
        assert all(isinstance(getattr(layer, a), decoder_type)
                   for a in ("qkv", "o_proj", "gate_up", "down"))
    assert isinstance(model.lm_head, Int8Linear if mode == "int8" else RescoredInt4Head)
    if mode != "int8":
        assert type(model.lm_head.coarse) is decoder_type
    # int8: N*K codes + 2 bytes of scale per row; int4 and w4a8: N*K/2 + 4 bytes per group of
    # 32 (the rescored head's decode read is its 4-bit pass).
    per_linear = {"int4": lambda n, k: n * k // 2 + 4 * n * k // 32,
                  "w4a8": lambda n, k: n * k // 2 + 4 * n * k // 32,
                  "int8": lambda n, k: n * k + 2 * n}[mode]
    shapes = [(96, 64), (64, 64), (128, 64), (64, 64)] * 2 + [(160, 64)]
    assert read_bytes == sum(per_linear(n, k) for n, k in shapes)
    with pytest.raises(ValueError, match="weight quantization"):
        quantize_model(_TinyModel(), "int3")


@pytest.mark.parametrize("batch", [1, 6, 70])  # 70 > INT4_MAX_PACKED_ROWS: dense 4-bit pass
def test_rescored_head_top_k_from_int8_rest_from_int4(batch):
    gen = torch.Generator().manual_seed(batch)
    lin = nn.Linear(64, 160, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 64, generator=gen))
    head = RescoredInt4Head(lin, top_k=8)
    x = torch.randn(batch, 64, generator=gen)
    coarse = head.coarse(x)
    out = head(x)
    idx = coarse.topk(8, dim=-1).indices
    w8 = head.weight_int8.double() * head.scales.double()[:, None]
    ref8 = x.to(torch.bfloat16).double() @ w8.T  # the int8 rows, bf16-rounded inputs
    assert torch.allclose(out.gather(1, idx).double(), ref8.gather(1, idx), rtol=1e-5, atol=1e-5)
    rest = torch.ones_like(out, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(out[rest], coarse[rest])
    # The rescored argmax is the int8 head's wherever that token made the 4-bit top 8.
    in_top = (idx == ref8.argmax(-1, keepdim=True)).any(-1)
    assert in_top.all()
    assert torch.equal(out.argmax(-1), ref8.argmax(-1))
