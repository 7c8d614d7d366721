"""W8A8 linears (engine/quant_w8a8.py) against float64 references computed by hand from their own
int8 codes and scales; per-row independence from batch-mates; the graph-mode protocol."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scission.engine.quant import quantize_model
from scission.engine.quant_w8a8 import (
    W8A8_MAX_IN_FEATURES,
    W8A8Head,
    W8A8Linear,
    W8A8RescoredHead,
    block_hadamard,
    quantize_per_token,
    residual_factor_for,
    rotate_blocks,
)

ROWS = (1, 3, 17, 64, 100)
# (terms, rotate): the mode's decoder linears (1, True), its LM head (2, False), plain (1, False)
CONFIGS = [(1, True), (2, False), (1, False)]


def make_linear(n: int, k: int, bias: bool, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    """Gaussian rows with two outlier channels, as decoder inputs have."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 30
    x[:, k // 2] *= -12
    return x


def float64_reference(q: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """The module's arithmetic in float64 from its own codes/scales and the quantization of
    ``x`` (rotated by the module's float32 rotation when it has one)."""
    m, f = x.shape[0], q.residual_factor
    if q.signs is not None:
        x = rotate_blocks(x, q.signs, q.hadamard)
    codes, s_x = quantize_per_token(x, f)
    w = q.weight_int8.double()
    acc = codes.double() @ w.T  # [M or 2M, N], exact integers
    if f:
        acc = acc[:m] * f + acc[m:]
    y = acc * q.weight_scales.double() * s_x.double()
    return y if q.bias is None else y + q.bias.double()


@pytest.mark.parametrize(("terms", "rotate"), CONFIGS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", ROWS)
def test_matches_float64_reference_of_its_codes(m, bias, terms, rotate):
    lin = make_linear(96, 192, bias)
    q = W8A8Linear(lin, terms=terms, rotate=rotate)
    x = activations(m, 192)
    got = q(x)
    assert got.shape == (m, 96) and got.dtype == torch.float32
    ref = float64_reference(q, x)
    # float32 rounding only: int32 -> float32, two products, the bias add.
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    # And the quantization itself, against x @ W^T with the float weights (BOUND_VS_FLOAT).
    exact = x.double() @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())
    rel = ((got.double() - exact).norm() / exact.norm()).item()
    assert rel < BOUND_VS_FLOAT[terms, rotate], rel


# Measured relative error against float weights and activations with these outlier channels:
# one term 2.2-2.7 %, rotated one term 0.68-0.82 %, two terms 0.56-0.65 % (the int8 weights).
BOUND_VS_FLOAT = {(1, False): 4e-2, (1, True): 1.3e-2, (2, False): 1e-2}


def test_rotation_is_the_orthogonal_block_hadamard():
    signs, h = block_hadamard(192)
    assert set(signs.tolist()) == {-1.0, 1.0} and h.shape == (64, 64)
    r = torch.diag(signs.double()) @ torch.block_diag(*[h.double()] * 3)  # [K, K]
    torch.testing.assert_close(r @ r.T, torch.eye(192, dtype=torch.float64), atol=1e-6, rtol=0)
    x = activations(5, 192)
    torch.testing.assert_close(rotate_blocks(x, signs, h).double(), x.double() @ r,
                               rtol=1e-5, atol=1e-5)
    # Spreads the outlier channels: the largest |value| per row shrinks.
    assert (rotate_blocks(x, signs, h).abs().amax(1) < x.abs().amax(1) / 2).all()


def test_two_terms_leave_only_the_weight_error():
    lin, x = make_linear(96, 160, False), activations(64, 160)
    wq = W8A8Linear(lin, terms=2, rotate=False)
    dequant = wq.weight_int8.double() * wq.weight_scales.double()[:, None]
    ref_wq = x.double() @ dequant.T  # exact activations, the same int8 weights
    rel = ((wq(x).double() - ref_wq).norm() / ref_wq.norm()).item()
    one = W8A8Linear(lin, terms=1, rotate=False)
    rel_one = ((one(x).double() - ref_wq).norm() / ref_wq.norm()).item()
    assert rel < 3e-4 < 1e-3 < rel_one, (rel, rel_one)


def test_quantize_per_token_bounds_and_zero_rows():
    x = activations(5, 64)
    x[2] = 0
    for f in (0, residual_factor_for(64)):
        codes, s = quantize_per_token(x, f)
        assert codes.dtype == torch.int8 and codes.abs().max() <= 127
        m = x.shape[0]
        s1 = s * f if f else s
        recon = codes[:m].double() * s1.double() + (codes[m:].double() * s.double() if f else 0)
        step = (s1 if not f else s).double()  # one unit of the last term
        assert ((recon - x.double()).abs() <= step / 2 + 1e-6 * x.abs().max()).all()
        assert (codes[2] == 0).all() and (f == 0 or (codes[m + 2] == 0).all())
    q = W8A8Linear(make_linear(32, 64, True), rotate=False)
    y = q(x)
    assert torch.equal(y[2], q.bias)  # all-zero input row: exactly the bias
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(("terms", "rotate"), CONFIGS)
def test_row_does_not_depend_on_batch_mates(terms, rotate):
    """Bitwise: each row computed alone equals the same row inside batches of every size in
    ROWS, and does not change when its batch-mates are 1000x larger."""
    q = W8A8Linear(make_linear(200, 192, True), terms=terms, rotate=rotate)
    x = activations(max(ROWS), 192)
    alone = torch.cat([q(x[i : i + 1]) for i in range(x.shape[0])])
    for m in ROWS:
        assert torch.equal(q(x[:m]), alone[:m]), m
    loud = x.clone()
    loud[1:] *= 1000
    assert torch.equal(q(loud)[0], alone[0])


def test_any_leading_shape_and_dtype():
    q = W8A8Linear(make_linear(48, 64, False))
    x = activations(6, 64).reshape(2, 3, 64)
    assert torch.equal(q(x), q(x.reshape(6, 64)).reshape(2, 3, 48))
    y16 = q(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and y16.shape == (2, 3, 48)


@pytest.mark.parametrize("head", [False, True])
def test_graph_linear_is_forward_and_traces(head):
    q = W8A8Head(make_linear(64, 128, False)) if head else W8A8Linear(make_linear(64, 128, True))
    x = activations(17, 128)
    args = q.graph_args()
    dtypes = [None if t is None else t.dtype for t in args]
    f32 = torch.float32
    assert dtypes == ([torch.int8, f32, None, None, None] if head
                      else [torch.int8, f32, f32, f32, f32])
    assert torch.equal(q.graph_linear(x, *args), q(x))
    compiled = torch.compile(q.graph_linear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, *args), q(x))
    extra = 0 if head else 4 * 64 + 4 * 128 + 4 * 64 * 64  # bias, signs, hadamard
    assert q.decode_read_bytes() == 64 * 128 + 4 * 64 + extra


def test_rescored_head_recomputes_top_k_from_int8_weights():
    lin = make_linear(500, 128, False)
    head = W8A8RescoredHead(lin, top_k=16)
    plain = W8A8Linear(lin, terms=1, rotate=False)  # the same codes: the coarse pass
    x = activations(9, 128)
    got, coarse = head(x), plain(x)
    idx = coarse.topk(16, dim=-1).indices
    dequant = head.weight_int8.double() * head.weight_scales.double()[:, None]
    fine = (x.double() @ dequant.T).gather(1, idx)
    torch.testing.assert_close(got.gather(1, idx).double(), fine, rtol=1e-5, atol=1e-6)
    keep = torch.ones_like(got, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(got[keep], coarse[keep])
    assert torch.equal(head.graph_linear(x, *head.graph_args()), got)


def test_bad_shapes_and_devices_are_refused():
    with pytest.raises(ValueError, match="overflow"):
        W8A8Linear(nn.Linear(W8A8_MAX_IN_FEATURES + 1, 1, bias=False), rotate=False)
    with pytest.raises(ValueError, match="overflow"):
        W8A8Linear(nn.Linear(70_000, 1, bias=False), terms=2, rotate=False)
    with pytest.raises(ValueError, match="terms"):
        W8A8Linear(nn.Linear(64, 8), terms=3)
    with pytest.raises(ValueError, match="rotation block"):
        W8A8Linear(nn.Linear(96, 8))
    with pytest.raises(ValueError, match="CPU"):
        W8A8Linear(nn.Linear(64, 8, device="meta"))
    with pytest.raises(ValueError, match="bias"):
        W8A8RescoredHead(nn.Linear(8, 8, bias=True))


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


def test_quantize_model_w8a8_replaces_every_linear_and_counts_bytes():
    model = _TinyModel()
    read_bytes = quantize_model(model, "w8a8")
    linears = [getattr(layer, a) for layer in model.layers
               for a in ("qkv", "o_proj", "gate_up", "down")] + [model.lm_head]
    assert all(type(q) is W8A8Linear and q.residual_factor == 0 and q.signs is not None
               for q in linears[:-1])
    assert type(model.lm_head) is W8A8Head and model.lm_head.residual_factor == 128
    # N*K codes + 4 bytes of scale per row (+ the float32 bias of qkv; + the rotation's signs
    # and 64x64 Hadamard block of each decoder linear).
    shapes = [(96, 64), (64, 64), (128, 64), (64, 64)] * 2 + [(160, 64)]
    rotation = 8 * (4 * 64 + 4 * 64 * 64)
    assert read_bytes == sum(n * k + 4 * n for n, k in shapes) + 2 * 4 * 96 + rotation
    rescored = _TinyModel()
    quantize_model(rescored, "w8a8", head_mode="w8a8-rescored")
    assert type(rescored.lm_head) is W8A8RescoredHead and rescored.lm_head.residual_factor == 0


def test_slow_int_mm_warning_follows_the_cpu_probes(monkeypatch, caplog):
    """Without VNNI or AMX (an AVX2-only CPU) building w8a8 warns; with either it does not."""
    from scission.engine.quant_w8a8 import warn_if_slow_int_mm

    for vnni, amx, warns in ((False, False, True), (True, False, False), (False, True, False)):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda v=vnni: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a)
        caplog.clear()
        with caplog.at_level("WARNING", logger="scission.engine.quant_w8a8"):
            assert warn_if_slow_int_mm() is warns
        assert ("AVX512-VNNI" in caplog.text) is warns
