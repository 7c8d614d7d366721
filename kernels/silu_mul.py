"""SiLU-and-mul, the gated MLP activation of Llama (Shazeer 2020, "GLU Variants").

``out[t] = silu(x[t, :d]) * x[t, d:]`` with ``silu(a) = a * sigmoid(a)``, in fp32 with one
rounding to the output dtype. Grid: ``(num_tokens, cdiv(d, BLOCK))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, stride_xt, stride_ot, D: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + token * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * stride_xt + D + offs, mask=mask, other=0.0).to(tl.float32)
    # -- silu(gate) * up --
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + token * stride_ot + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(
    x: torch.Tensor, *, out: torch.Tensor | None = None, block: int = 1024,
) -> torch.Tensor:
    """``silu(x[:, :d]) * x[:, d:]``.

    Args:
        x: ``[num_tokens, 2 * d]``, fp32/bf16/fp16, last dim contiguous (gate | up).
        out: optional ``[num_tokens, d]`` output in x's dtype.
        block: elements of ``d`` per program (power of two).

    Returns:
        ``out``: ``[num_tokens, d]``, x's dtype.
    """
    num_tokens, two_d = x.shape
    assert two_d % 2 == 0 and x.stride(1) == 1, f"x must be [n, 2 * d] row-major, got {x.shape}"
    assert block > 0 and block & (block - 1) == 0, "block must be a power of two"
    d = two_d // 2
    if out is None:
        out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    assert out.shape == (num_tokens, d) and out.dtype == x.dtype and out.stride(1) == 1
    if num_tokens == 0:
        return out
    block = min(block, triton.next_power_of_2(d))
    grid = (num_tokens, triton.cdiv(d, block))
    _silu_mul_kernel[grid](x, out, x.stride(0), out.stride(0), D=d, BLOCK=block)
    return out
