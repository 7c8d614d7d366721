"""silu_mul: silu(x[:, :d]) * x[:, d:] against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from scission.kernels.reference import ref_silu_mul, rel_error
from scission.kernels.silu_mul import silu_mul

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


@pytest.mark.parametrize(
    ("num_tokens", "d", "dtype", "block"),
    [(1, 64, torch.float32, 1024), (7, 100, torch.bfloat16, 32), (5, 1536, torch.float32, 512)],
    ids=_dtype_id,
)
def test_silu_mul_matches_reference(gen, device, num_tokens, d, dtype, block):
    """Every output element (several programs per row, ragged last block) is written."""
    x = (3 * torch.randn(num_tokens, 2 * d, generator=gen)).to(device, dtype)
    out = torch.full((num_tokens, d), float("nan"), dtype=dtype, device=device)
    assert silu_mul(x, out=out, block=block) is out
    assert torch.isfinite(out).all()
    err = rel_error(out, ref_silu_mul(x))
    assert err < TOL[dtype], f"relative error {err:.2e}"
