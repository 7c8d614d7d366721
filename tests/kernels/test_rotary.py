"""rotary_embedding (neox layout), from a cos/sin cache and from theta, vs float64."""

from __future__ import annotations

import pytest
import torch

from scission.kernels.reference import ref_cos_sin_cache, ref_rotary, rel_error
from scission.kernels.rotary import rotary_embedding

# Angles are fp32 (as in HF), so both sides rotate by the same angle; what is left is cos/sin
# and the output rounding.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
MAX_POSITION = 4096


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "dtype", "from_cache", "theta"),
    [
        (4, 4, 64, torch.float32, True, 10000.0),
        (6, 2, 128, torch.bfloat16, True, 500000.0),
        (9, 3, 64, torch.float32, False, 10000.0),
        (8, 2, 128, torch.bfloat16, False, 1000000.0),
    ],
    ids=_dtype_id,
)
def test_rotary_matches_reference(gen, device, num_heads, num_kv_heads, head_dim, dtype,
                                  from_cache, theta):
    """q and k are rotated in place by their positions (0, large, repeated, unsorted)."""
    num_tokens = 11
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen)
    positions[:3] = torch.tensor([0, MAX_POSITION - 1, 7])
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    cache = ref_cos_sin_cache(MAX_POSITION, head_dim, theta)
    ref_q, ref_k = ref_rotary(positions, q, cache), ref_rotary(positions, k, cache)
    kwargs = {"cos_sin_cache": cache.to(device)} if from_cache else {"theta": theta}
    out_q, out_k = rotary_embedding(positions.to(device), q, k, **kwargs)
    assert out_q is q and out_k is k, "rotation is in place"
    for out, ref in ((q, ref_q), (k, ref_k)):
        err = rel_error(out, ref)
        assert err < TOL[dtype], f"relative error {err:.2e}"


def test_rotary_position_zero_is_identity(gen, device):
    """At position 0 every angle is 0: q and k come back bit-identical."""
    q = torch.randn(3, 4, 64, generator=gen).to(device)
    k = torch.randn(3, 2, 64, generator=gen).to(device)
    q0, k0 = q.clone(), k.clone()
    rotary_embedding(torch.zeros(3, dtype=torch.int64, device=device), q, k, theta=10000.0)
    assert torch.equal(q, q0) and torch.equal(k, k0)
