"""RMSNorm (Zhang & Sennrich, 2019), optionally fused with the residual add.

Without a residual: ``out = x / sqrt(mean(x^2) + eps) * weight``. With one (vLLM's
``fused_add_rms_norm``): ``residual <- x + residual`` in place, rounded to the model dtype,
then ``out = rms_norm(residual) * weight``. Rounding follows HF Llama: statistics in fp32,
the normalised row cast to x's dtype before the weight multiply. One program per row; the
whole row is one tile (hidden sizes up to ``MAX_HIDDEN``).
"""

from __future__ import annotations

from typing import overload

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, eps,
    stride_xt, stride_rt, stride_ot,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_xt + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # -- fused residual add --
        res = tl.load(residual_ptr + row * stride_rt + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * stride_rt + offs, x, mask=mask)
    # -- normalise --
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_ot + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor: ...


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor,
    *, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(x, weight, eps, residual=None, *, out=None):
    """RMSNorm over the last dim, with an optional fused in-place residual add.

    Args:
        x: ``[num_tokens, hidden]``, fp32/bf16/fp16, last dim contiguous.
        weight: ``[hidden]``, any float dtype.
        eps: added to the mean square.
        residual: optional ``[num_tokens, hidden]`` in x's dtype; updated in place to
            ``x + residual``.
        out: optional ``[num_tokens, hidden]`` output in x's dtype (may alias ``x``).

    Returns:
        ``out`` without a residual, else ``(out, residual)``.
    """
    num_tokens, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous(), f"weight must be [{hidden}]"
    assert x.stride(1) == 1, "x's last dim must be contiguous"
    assert hidden <= MAX_HIDDEN, f"hidden {hidden} > {MAX_HIDDEN}: one tile per row"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride(1) == 1
    if num_tokens > 0:
        res = residual if residual is not None else x  # placeholder, never read
        _rms_norm_kernel[(num_tokens,)](
            x, res, weight, out, eps, x.stride(0), res.stride(0), out.stride(0),
            HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden),
            HAS_RESIDUAL=residual is not None,
        )
    return out if residual is None else (out, residual)
