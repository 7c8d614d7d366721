"""rms_norm, plain and with the fused residual add, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from scission.kernels.reference import ref_rms_norm, rel_error
from scission.kernels.rms_norm import rms_norm

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # bf16: two roundings of ~2**-9 each
# The residual sum is one rounding: exact in fp32; within one bf16 ulp because the Triton
# interpreter (3.9) truncates fp32 -> bf16 where compiled kernels round to nearest even.
RESIDUAL_RTOL = {torch.float32: 0.0, torch.bfloat16: 2**-7}


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


@pytest.mark.parametrize(
    ("num_tokens", "hidden", "dtype", "fused"),
    [
        (1, 64, torch.float32, False),
        (7, 96, torch.bfloat16, True),
        (5, 1000, torch.float32, True),
        (3, 576, torch.bfloat16, False),
    ],
    ids=_dtype_id,
)
def test_rms_norm_matches_reference(gen, device, num_tokens, hidden, dtype, fused):
    """Output within tolerance; the residual becomes x + residual rounded to the dtype."""
    x = torch.randn(num_tokens, hidden, generator=gen).to(device, dtype)
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(device, dtype) if fused else None
    ref_out, ref_residual = ref_rms_norm(x, weight, 1e-6, residual)
    out = torch.full_like(x, float("nan"))  # poison: an unwritten element fails
    result = rms_norm(x, weight, 1e-6, residual, out=out)
    if fused:
        assert result[0] is out and result[1] is residual, "residual is updated in place"
        torch.testing.assert_close(result[1], ref_residual, rtol=RESIDUAL_RTOL[dtype], atol=0)
    else:
        assert result is out
    assert torch.isfinite(out).all()
    err = rel_error(out, ref_out)
    assert err < TOL[dtype], f"relative error {err:.2e}"
