"""W8A8 linears: int8 weights per output channel, int8 activations per token, int32 GEMM.

``EngineConfig.weight_quantization="w8a8"`` (``engine/quant.py: quantize_model``) replaces
every decoder linear by ``W8A8Linear`` and the LM head by ``W8A8Head``. Unlike the weight-only
modes (whose kernels dequantize weights to bfloat16 and multiply in floating point), both GEMM
operands are int8 and the product accumulates in int32 through ``torch._int_mm`` (oneDNN's
VNNI int8 GEMM on CPU), for the compute-bound cases: prefill chunks and batched decode.

Scheme (SmoothQuant's "W8A8 per-token dynamic" baseline, Xiao et al. 2023; LLM.int8()'s
vector-wise quantization without its outlier split, Dettmers et al. 2022; vLLM's
compressed-tensors ``W8A8 int8`` scheme with dynamic per-token activation scales)::

    weights, once:         s_w[n] = max_k |W[n, k]| / 127,  W_q = round(W / s_w[:, None])
    activations, per call: s_x[m] = max_k |x[m, k]| / 127,  q1 = round(x / s_x[:, None])
    one term:   y[m, n] = (q1 @ W_q^T)[m, n] * s_w[n] * s_x[m]  (+ bias[n])

One term alone is not accurate enough on SmolLM2-135M: its decoder inputs have outlier
channels (a row's max is 10-27x its RMS), so per-token int8 costs 1.6-2.7 % per linear against
0.7-0.9 % for int8 weights with bfloat16 activations, and the whole model flips top-1 on 5 of
the 22 test prompts (logits relative error 0.038-0.183 vs HF float32). Static SmoothQuant
smoothing (alpha 0.5, calibrated on other text) did not fix it (13/22). Two remedies here:

- rotation (QuaRot, Ashkboos et al. 2024; SpinQuant): ``x W^T = (x R)(W R)^T`` for orthogonal
  ``R``; with ``R`` = random signs times a 64x64 Hadamard per block of 64 channels
  (``block_hadamard``), an outlier channel is spread over its block, so the per-token scale
  shrinks. ``W R`` is quantized once; ``x R`` is one small GEMM per call (``rotate_blocks``).
- two int8 terms: the rounding residual in units of ``s_x / F``::

      q2 = round((x - q1 * s_x) / (s_x / F)),  |q2| <= F / 2
      y = ((q1 @ W_q^T) * F + q2 @ W_q^T) * s_w * s_x / F     (one _int_mm of 2M rows)

  with ``F = residual_factor_for(K)`` (128 for K = 576, 64 for K = 1536) so that the combined
  sum stays exact in int32: the activation error drops F-fold, at twice the GEMM rows.

The mode: decoder linears rotated with one term (``W8A8Linear`` defaults); the LM head
(``W8A8Head``) with two terms and no rotation, since it decides the greedy token. Against HF
float32 on the 22 prompts (tests/engine/test_quant_engine.py): top-1 22/22, logits error
0.013-0.120 (mean 0.031), greedy agreement mean 19.5 of 32 tokens (int8 weight-only: 22/22,
0.011-0.059, 20.5). Measured alternatives (bench/README.md "W8A8"): two terms everywhere
22/22, 0.011-0.078, 21.8, but 1.3-2x instead of 2-3x faster than float32 GEMMs; rotated one
term with a one-term head whose top 64 logits are recomputed from the int8 weights with float
activations (``W8A8RescoredHead``, ``head_mode="w8a8-rescored"``): 22/22 but error up to
0.133; rotation with a plain one-term head: 21/22; no rotation, one term: 17/22.

Codes are symmetric in ``[-127, 127]``; rounding is round-half-to-even; all scales are float32.
The int32 sums are exact and every other step works within one row of ``x`` (the rotation too): a
request's output row depends only on its own activations, never on its batch-mates'
(bitwise; ``tests/engine/test_quant_w8a8.py``). ``torch._int_mm`` on CPU (torch 2.13) takes
any ``M >= 1`` and any ``K``, ``N`` (the CUDA kernel's ``M > 16`` and multiple-of-8 rules do
not apply; checked exact for M in 1..512), and a transposed view of the contiguous ``[N, K]``
codes as its ``[K, N]`` operand runs as fast as a contiguous copy: no padding, no fallback.
On x86 without VNNI, oneDNN's ``vpmaddubsw`` path could saturate int16 partial sums; the unit
test's exact reference would catch it (it passed on AVX512-VNNI Zen 4 and on AVX2-only Zen 2).

Speed needs int8 dot-product instructions (AVX512-VNNI or AMX: ``int8_dot_product_supported``).
On an AVX2-only CPU (Zen 2, 2026-12-01) ``torch._int_mm`` ran 30-110x slower than a float32
matmul of the same shape (M = 1 / 512, K = 576, N = 1536: 15.5 / 396 ms vs 0.14 / 8.9 ms) and a
512-token w8a8 prefill took 32 s; building a w8a8 model there logs a warning.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from scission.engine.quant import quantize_int8_per_channel

W8A8_MAX_IN_FEATURES = (2**31 - 1) // (127 * 127)  # 133,144: int32 accumulation cannot overflow
RESCORE_TOP_K = 64
ROTATION_BLOCK = 64  # Hadamard block of the activation rotation
_MIN_SCALE = torch.finfo(torch.float32).tiny  # all-zero rows: scale > 0, codes 0, output 0
logger = logging.getLogger(__name__)


def int8_dot_product_supported() -> bool:
    """Whether this CPU has the int8 dot-product instructions oneDNN's int8 GEMM (behind
    ``torch._int_mm``) needs to be fast: AVX512-VNNI or AMX (torch's own CPU probes)."""
    probes = (getattr(torch.cpu, "_is_vnni_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(p is not None and p() for p in probes)


def warn_if_slow_int_mm() -> bool:
    """Log a warning when this CPU lacks int8 dot-product instructions (module docstring:
    w8a8 is then many times slower than float32, though still correct). Returns whether it
    warned."""
    if int8_dot_product_supported():
        return False
    logger.warning("w8a8 on a CPU without int8 dot-product instructions (AVX512-VNNI / AMX; "
                   "torch reports %s): torch._int_mm runs 30-110x slower than float32 here "
                   "(measured on AVX2); int4 or int8 weight-only quantization is faster on "
                   "this CPU", torch.backends.cpu.get_cpu_capability())
    return True


def residual_factor_for(in_features: int) -> int:
    """The largest power of two ``F <= 128`` with ``|acc1 * F + acc2|`` inside int32 for
    ``in_features`` (``|acc1| <= K * 127^2``, ``|acc2| <= K * 127 * (F / 2 + 1)``).

    Raises:
        ValueError: ``in_features`` so large that not even ``F = 2`` fits.
    """
    f = 128
    while f >= 2 and in_features * 127 * (127 * f + f // 2 + 1) > 2**31 - 1:
        f //= 2
    if f < 2:
        raise ValueError(f"in_features {in_features}: two-term int8 activations overflow int32")
    return f


def quantize_per_token(x: torch.Tensor, residual_factor: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of each row of ``x``, in one or two int8 terms.

    Args:
        x: ``[M, K]`` any float dtype (computed in float32).
        residual_factor: 0 = one term, ``x ≈ q1 * s``; ``F > 0`` = also the rounding residual
            in units of ``s / F``: ``x ≈ q1 * s + q2 * s / F``, ``|q2| <= F / 2`` (F times less
            activation error).
    Returns:
        ``(codes, scales)``: codes int8 in ``[-127, 127]``, ``[M, K]`` (one term) or ``[2M, K]``
        (``q1`` rows then ``q2`` rows); scales ``[M, 1]`` float32: ``s`` (one term) or
        ``s / F`` (two terms). An all-zero row gets ``s = finfo(float32).tiny`` and codes 0.
        Non-finite values give NaN outputs downstream (not checked).
    """
    xf = x.float()
    scales = (xf.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=_MIN_SCALE)  # [M, 1]
    q1 = torch.round(xf / scales).clamp(-127, 127)  # [M, K], float32
    if not residual_factor:
        return q1.to(torch.int8), scales
    scales_r = scales / residual_factor
    q2 = torch.round((xf - q1 * scales) / scales_r).clamp(-127, 127)
    return torch.cat([q1, q2]).to(torch.int8), scales_r


def w8a8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scales: torch.Tensor,
                bias: torch.Tensor | None, residual_factor: int = 0) -> torch.Tensor:
    """``x @ W^T (+ bias)`` in W8A8 (module docstring), a pure function of its arguments.

    Args:
        x: ``[M, K]`` any float dtype, ``M >= 1``.
        weight_int8: ``[N, K]`` int8 codes, contiguous.
        weight_scales: ``[N]`` float32.
        bias: ``[N]`` float32 or None.
        residual_factor: ``quantize_per_token``'s; two terms run one GEMM of ``2M`` rows and
            combine ``acc1 * F + acc2`` in int32 (exact: ``residual_factor_for``).
    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    m = x.shape[0]
    codes, s_x = quantize_per_token(x, residual_factor)
    acc = torch._int_mm(codes, weight_int8.t())  # [M or 2M, N] int32, exact
    if residual_factor:
        acc = torch.add(acc[m:], acc[:m], alpha=residual_factor)  # [M, N] int32, exact
    y = torch.mul(acc, weight_scales).mul_(s_x)  # int32 * float32 -> float32 [M, N]
    if bias is not None:
        y = y.add_(bias)
    return y.to(x.dtype)


def block_hadamard(in_features: int, block: int = ROTATION_BLOCK
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal rotation ``R = diag(signs) @ blockdiag(H, ..., H)`` (QuaRot's randomized
    Hadamard transform, applied per block of ``block`` input channels).

    Returns:
        ``(signs, hadamard)``: signs ``[K]`` float32 of +-1 (seeded by ``K``: the same model
        gives the same rotation); hadamard ``[block, block]`` float32 Sylvester matrix / sqrt.
    Raises:
        ValueError: ``in_features`` is not a multiple of ``block`` (a power of two).
    """
    if in_features % block or block & (block - 1):
        raise ValueError(f"in_features {in_features} is not a multiple of the rotation block "
                         f"{block} (a power of two)")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(in_features)
    signs = torch.where(torch.rand(in_features, generator=gen) < 0.5, -1.0, 1.0)
    return signs.float(), (h / block**0.5).float()


def rotate_blocks(x: torch.Tensor, signs: torch.Tensor, hadamard: torch.Tensor) -> torch.Tensor:
    """``x @ R`` for ``block_hadamard``'s ``R``: ``x`` ``[M, K]`` any float dtype -> ``[M, K]``
    float32 (one GEMM of ``[M * K / block, block] x [block, block]``)."""
    m, k = x.shape
    b = hadamard.shape[0]
    return ((x.float() * signs).view(m, k // b, b) @ hadamard).view(m, k)


class W8A8Linear(nn.Module):
    """``y = x @ W^T (+ bias)`` with int8 weights (one float32 scale per output row) and
    per-token dynamic int8 activations through ``torch._int_mm`` (module docstring).

    Args:
        linear: the float layer (weight ``[N, K]``, optional bias ``[N]``), on CPU.
        terms: int8 terms per activation: 1 (default; per-token int8) or 2 (``q1`` + the
            rounding residual, ~F times less activation error for twice the GEMM rows).
        rotate: multiply activations by ``block_hadamard``'s rotation ``R`` before quantizing
            them (and the weights by ``R`` once): ``x W^T = (x R)(W R)^T``; spreads outlier
            channels over their block of 64 so per-token int8 loses less (default True).

    Input ``[..., in_features]`` of any float dtype, any number of rows (1 included); output
    ``[..., out_features]`` in the input dtype. One code path for every batch size: decode and
    prefill use the same kernel and the same weights (no dense copy).

    Graph-mode protocol (``engine/compile.py``): ``graph_args()`` returns the tensors and
    ``graph_linear(x2d, *graph_args())`` computes ``forward(x2d)`` from them alone.

    Raises:
        ValueError: ``terms`` not 1 or 2; ``in_features`` too large for exact int32 sums
            (``> W8A8_MAX_IN_FEATURES`` for one term, ``> 66,052`` for two); not on CPU.
    """

    def __init__(self, linear: nn.Linear, terms: int = 1, rotate: bool = True) -> None:
        super().__init__()
        n, k = linear.weight.shape
        if terms not in (1, 2):
            raise ValueError(f"terms must be 1 or 2, got {terms}")
        signs, hadamard = block_hadamard(k) if rotate else (None, None)
        self.residual_factor = residual_factor_for(k) if terms == 2 else 0
        if k > W8A8_MAX_IN_FEATURES:
            raise ValueError(f"in_features {k} > {W8A8_MAX_IN_FEATURES}: the int32 sum of "
                             f"int8 products could overflow")
        if linear.weight.device.type != "cpu":
            raise ValueError("W8A8 linears run on CPU only")
        weight = linear.weight.detach()
        codes, scales = quantize_int8_per_channel(
            weight if signs is None else rotate_blocks(weight, signs, hadamard))
        self.out_features, self.in_features = n, k
        self.register_buffer("weight_int8", codes)  # [N, K] int8, contiguous (rotated W)
        self.register_buffer("weight_scales", scales)  # [N] float32
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)  # [N] float32 or None
        self.register_buffer("signs", signs)  # [K] float32 or None
        self.register_buffer("hadamard", hadamard)  # [64, 64] float32 or None

    def graph_args(self) -> tuple[torch.Tensor | None, ...]:
        """``(weight_int8 [N, K] int8, weight_scales [N] float32, bias [N] float32 | None,
        signs [K] float32 | None, hadamard [64, 64] float32 | None)``."""
        return self.weight_int8, self.weight_scales, self.bias, self.signs, self.hadamard

    def graph_linear(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        """``x``: ``[M, K]``; ``args`` = ``graph_args()``. Returns ``[M, N]`` in ``x.dtype``;
        reads no tensor of ``self`` (traceable by ``torch.compile(fullgraph=True)``)."""
        weight_int8, weight_scales, bias, signs, hadamard = args
        xr = x if signs is None else rotate_blocks(x, signs, hadamard)
        return w8a8_linear(xr, weight_int8, weight_scales, bias, self.residual_factor).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self.graph_linear(flat, *self.graph_args())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def decode_read_bytes(self) -> int:
        """Weight bytes a call reads: int8 codes + float32 scales (+ bias)."""
        return sum(t.numel() * t.element_size() for t in self.graph_args() if t is not None)


class W8A8Head(W8A8Linear):
    """The ``"w8a8"`` mode's LM head: ``W8A8Linear`` with two activation terms and no rotation
    (module docstring: the head decides greedy tokens, so it gets the accurate variant)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, terms=2, rotate=False)


class W8A8RescoredHead(W8A8Linear):
    """LM head: W8A8 logits for the whole vocabulary, then each row's ``top_k`` highest
    recomputed from the same int8 weights with float32 activations (no activation rounding)
    and written over the W8A8 values, as ``engine/quant.py: RescoredInt4Head`` does for int4.

    Input ``[..., in_features]`` any float dtype; output ``[..., out_features]`` same dtype.
    Raises ``ValueError`` as ``W8A8Linear``, and for a linear with a bias.
    """

    def __init__(self, linear: nn.Linear, top_k: int = RESCORE_TOP_K, terms: int = 1) -> None:
        if linear.bias is not None:
            raise ValueError("W8A8RescoredHead has no bias")
        super().__init__(linear, terms, rotate=False)
        self.top_k = min(top_k, self.out_features)

    def graph_linear(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        weight_int8, weight_scales, bias = args[:3]
        logits = w8a8_linear(x, weight_int8, weight_scales, bias,
                             self.residual_factor)  # [M, V], x.dtype
        idx = logits.topk(self.top_k, dim=-1).indices  # [M, k]
        w = weight_int8[idx].float()  # [M, k, K]
        fine = torch.bmm(w, x.float()[:, :, None])[..., 0] * weight_scales[idx]  # [M, k]
        return logits.scatter(1, idx, fine.to(logits.dtype))

    def decode_read_bytes(self) -> int:
        """The W8A8 pass; the rescored rows add ``top_k * in_features`` bytes per row."""
        return super().decode_read_bytes()
