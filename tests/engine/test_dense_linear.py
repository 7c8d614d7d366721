"""oneDNN linears with prepacked weights (engine/dense_linear.py) against a float64 reference,
and how the engine picks them (``EngineConfig.linear_backend``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scission.engine.config import CacheConfig, EngineConfig
from scission.engine.dense_linear import OneDNNLinear, onednn_available, pack_dense_linears
from scission.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.skipif(not onednn_available(torch.float32, "cpu"),
                                reason="torch built without oneDNN")

# bfloat16 packing needs oneDNN's bf16 path (AVX512-BW/VL/DQ or AVX-NE-CONVERT): not on AVX2-only
# CPUs, where "auto" keeps bfloat16 on F.linear (test_bfloat16_without_a_onednn_path_stays_plain).
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not onednn_available(torch.bfloat16, "cpu"), reason="this CPU has no oneDNN bf16 path"))]

# Float32: a K=576 dot product in another summation order; bfloat16: the inputs and weights are
# exactly representable (rounded first), the product accumulates in float32 and rounds once.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 64, 513])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_float64(dtype, rows, bias):
    torch.manual_seed(rows)
    lin = nn.Linear(576, 960, bias=bias, dtype=dtype)
    x = torch.randn(rows, 576).to(dtype)
    want = x.double() @ lin.weight.double().T
    if bias:
        want += lin.bias.double()
    got = OneDNNLinear(lin)(x)
    assert got.dtype == dtype and got.shape == (rows, 960)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < TOLERANCE[dtype]


def test_onednn_linear_keeps_leading_dims_and_strided_inputs():
    lin = nn.Linear(64, 48, bias=True)
    q = OneDNNLinear(lin)
    x = torch.randn(2, 5, 128)[..., ::2]  # [2, 5, 64], not contiguous
    torch.testing.assert_close(q(x), lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight, lin.weight)  # unpacked on demand


def test_onednn_linear_refuses_float16():
    with pytest.raises(ValueError, match="no oneDNN linear"):
        OneDNNLinear(nn.Linear(8, 8, dtype=torch.float16))


def test_bfloat16_without_a_onednn_path_stays_plain(monkeypatch):
    """On a CPU without oneDNN's bf16 path (an AVX2-only one: packing raises inside oneDNN),
    bfloat16 linears are not packed and ``OneDNNLinear`` refuses them; float32 still packs."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not onednn_available(torch.bfloat16, "cpu")
    assert onednn_available(torch.float32, "cpu")
    model = nn.Module()
    model.layers = nn.ModuleList()
    model.lm_head = nn.Linear(8, 100, bias=False, dtype=torch.bfloat16)
    assert pack_dense_linears(model) == 0 and type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="no oneDNN linear"):
        OneDNNLinear(nn.Linear(8, 8, dtype=torch.bfloat16))
    model.lm_head = nn.Linear(8, 100, bias=False)
    assert pack_dense_linears(model) == 1


def test_pack_dense_linears_replaces_every_plain_linear():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o_proj = nn.Linear(8, 24), nn.Linear(8, 8, bias=False)
            self.gate_up, self.down = nn.Linear(8, 32, bias=False), nn.Linear(16, 8, bias=False)

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    model.lm_head = nn.Linear(8, 100, bias=False)
    assert pack_dense_linears(model) == 9
    assert all(isinstance(getattr(layer, a), OneDNNLinear) for layer in model.layers
               for a in ("qkv", "o_proj", "gate_up", "down"))
    assert isinstance(model.lm_head, OneDNNLinear)
    assert pack_dense_linears(model) == 0  # already packed


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_linear_compiled_equals_forward(dtype):
    """Graph mode's opaque op (``scission::onednn_linear``) under ``torch.compile`` with the
    token dimension dynamic: the same bits as ``forward`` (the same oneDNN call), for two
    layers through one compiled graph (no recompile per layer), and the op refuses a handle
    whose module is gone."""
    torch.manual_seed(0)
    a, b = (OneDNNLinear(nn.Linear(64, 96, dtype=dtype)) for _ in range(2))
    fn = torch.compile(lambda x, *args: torch.relu(OneDNNLinear.graph_linear(x, *args)),
                       fullgraph=True, dynamic=True)
    for rows in (3, 17):
        x = torch.randn(rows, 64, dtype=dtype)
        for lin in (a, b):
            got = fn(x, *lin.graph_args())
            assert got.dtype == dtype and got.shape == (rows, 96)
            assert torch.equal(got, torch.relu(lin(x)))
    assert not torch.equal(fn(x, *a.graph_args()), fn(x, *b.graph_args()))
    handle = b.handle
    del b, lin  # the loop variable still held b
    import gc

    gc.collect()
    with pytest.raises(KeyError):
        torch.ops.scission.onednn_linear(x, handle, 96, None)


def test_linear_backend_choice(tokenizer):
    kw = dict(num_threads=2, cache=CacheConfig(num_blocks=16))
    auto = LLMEngine(EngineConfig(**kw), tokenizer=tokenizer)
    assert isinstance(auto.model.layers[0].gate_up, OneDNNLinear)
    assert isinstance(auto.model.lm_head, OneDNNLinear)
    plain = LLMEngine(EngineConfig(linear_backend="torch", **kw), tokenizer=tokenizer)
    assert type(plain.model.layers[0].gate_up) is nn.Linear
    with pytest.raises(ValueError, match="linear_backend must be"):
        EngineConfig(linear_backend="mkl")
    with pytest.raises(ValueError, match="no oneDNN linear for float16"):
        LLMEngine(EngineConfig(dtype="float16", linear_backend="onednn", **kw),
                  tokenizer=tokenizer)
