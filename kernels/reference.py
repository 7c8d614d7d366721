"""Pure-torch float64 references for every kernel in ``scission.kernels`` (tests only).

Each ``ref_<name>`` loops over requests and block tables the obvious way (as vLLM's
``ref_paged_attn``) and returns float64 results on the CPU; ``rel_error`` is the metric the
tests bound: ``||out - ref|| / ||ref||``.
"""

from __future__ import annotations

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_2 / ||ref||_2`` in float64; NaN anywhere in ``out`` yields NaN."""
    out64, ref64 = out.detach().cpu().double(), ref.detach().cpu().double()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64))


def gather_context(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int):
    """``[seq_len, num_kv_heads, head_dim]`` float64 rows of one request's paged context."""
    block_size = cache.shape[1]
    pos = torch.arange(seq_len)
    blocks = block_table_row.cpu().to(torch.int64)[pos // block_size]
    return cache[blocks.to(cache.device), (pos % block_size).to(cache.device)].cpu().double()


def ref_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Query rows of request r are its last ``q_len`` positions and attend causally."""
    out = torch.empty(q.shape, dtype=torch.float64)
    gqa = q.shape[1] // k_cache.shape[2]
    cu = cu_seqlens_q.tolist()
    for r, seq_len in enumerate(seq_lens.tolist()):
        q_r = q[cu[r] : cu[r + 1]].cpu().double()  # [q_len, H, D]
        q_len = q_r.shape[0]
        k_ctx = gather_context(k_cache, block_table[r], seq_len).repeat_interleave(gqa, 1)
        v_ctx = gather_context(v_cache, block_table[r], seq_len).repeat_interleave(gqa, 1)
        scores = torch.einsum("qhd,khd->hqk", q_r, k_ctx) * scale  # [H, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        visible = torch.arange(seq_len)[None, :] <= q_pos  # [q_len, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[cu[r] : cu[r + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_ctx)
    return out


def ref_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Decode = prefill with one query row per request (the last position)."""
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return ref_prefill_attention(q, k_cache, v_cache, block_table, seq_lens, cu, scale)


def ref_kv_cache_write(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with token ``t`` written at slot ``slot_mapping[t]`` (-1 = skip)."""
    k_out, v_out = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_out[slot // block_size, slot % block_size] = k[t]
        v_out[slot // block_size, slot % block_size] = v[t]
    return k_out, v_out


def ref_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rms_norm(x + residual) * weight, x + residual)``; the sum is rounded to x's dtype
    first, as in HF Llama where the residual stream lives in the model dtype."""
    new_residual = None
    if residual is not None:
        new_residual = (x.double() + residual.double()).to(x.dtype)
        x = new_residual
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return normed * weight.double(), new_residual


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """``[rotary_dim // 2]`` fp32 inverse frequencies, computed exactly as HF Llama does."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (theta**exponent)


def ref_cos_sin_cache(max_position: int, rotary_dim: int, theta: float) -> torch.Tensor:
    """``[max_position, rotary_dim]`` fp32: ``cos`` in the first half, ``sin`` in the second."""
    angles = torch.arange(max_position, dtype=torch.float32)[:, None] * rope_inv_freq(
        rotary_dim, theta
    )[None, :]
    return torch.cat([angles.double().cos(), angles.double().sin()], -1).float()


def ref_rotary(
    positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor,
) -> torch.Tensor:
    """Neox rotary (``rotate_half``) of ``x: [num_tokens, H, D]`` by ``positions``."""
    half = x.shape[-1] // 2
    cs = cos_sin_cache[positions.cpu()].double()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    x64 = x.cpu().double()
    x1, x2 = x64[..., :half], x64[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def ref_silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :d]) * x[:, d:]`` for ``x: [n, 2 * d]``."""
    d = x.shape[-1] // 2
    x64 = x.cpu().double()
    return torch.nn.functional.silu(x64[..., :d]) * x64[..., d:]


def ref_kv_gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Staging buffer ``[n, block_size, H, D]`` with ``staging[i] = cache[block_ids[i]]``."""
    return torch.stack([cache[b] for b in block_ids.tolist()])


def ref_kv_scatter(
    cache: torch.Tensor, staging: torch.Tensor, block_ids: torch.Tensor,
) -> torch.Tensor:
    """Copy of ``cache`` with ``cache[block_ids[i]] = staging[i]``."""
    out = cache.clone()
    for i, b in enumerate(block_ids.tolist()):
        out[b] = staging[i]
    return out


def ref_w4a8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                mins: torch.Tensor) -> torch.Tensor:
    """Float64 reference of ``scission.kernels.w4a8.w4a8_mm`` ``[M, N]``.

    ``x`` ``[M, K]`` float32 is quantized as the kernel does it, in float32 (per row and block
    of 32: ``e = max|x| / 127``, ``a = round_half_even(x * (127 / max|x|))``, 0 for an all-zero
    block); the weights are ``codes [N, K]`` (0..15) times float16 ``scales`` plus float16
    ``mins`` (``[N, K // 32]``); every product and sum after that is float64.
    """
    m, k = x.shape
    n = codes.shape[0]
    g = k // 32
    xb = x.float().reshape(m, g, 32)
    amax = xb.abs().amax(dim=-1)  # [M, G] float32
    # a true float32 division, as the kernel's 127.f / amax: torch's scalar / tensor multiplies
    # by a reciprocal and is off by an ulp for ~1/4 of inputs, which flips a tie's rounding
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    a = torch.round(xb * inv[..., None]).double()  # half to even, as nearbyintf
    e = (amax / 127.0).double()
    d = scales.to(torch.float16).double()
    mn = mins.to(torch.float16).double()
    q = codes.double().reshape(n, g, 32)
    dots = torch.einsum("mgj,ngj->mng", a, q)  # [M, N, G]
    return (dots * d[None] * e[:, None] + mn[None] * (e * a.sum(-1))[:, None]).sum(-1)


def ref_llama_decode_step(
    h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layers: list[dict],
    final_norm: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    block_table: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
    num_heads: int, num_kv_heads: int, eps: float, cu_seqlens_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 reference of ``scission.kernels.llama_decode.LlamaDecodeStep``: one decode token
    per request (or, with ``cu_seqlens_q``, request r's query rows ``cu[r] .. cu[r + 1] - 1``,
    causal within its context) through every layer, ``[n, hidden]`` float64 final-normed
    hidden states. A slot of -1 is not written.

    ``layers[i]`` holds ``input_norm``, ``post_norm``, optional ``qkv_bias`` and, for each of
    ``qkv``, ``o_proj``, ``gate_up``, ``down``, a ``(codes, scales, mins)`` triple
    (``ref_w4a8_mm``'s; each linear's input is rounded to float32 and quantized as the kernel
    does). Writes the K/V rows (float32) into ``kv_caches`` (pass copies); attention reads
    them back through ``ref_decode_attention``'s path, in float64.
    """
    n, hidden = h.shape
    head_dim = 2 * cos.shape[1]
    qs, kvs = num_heads * head_dim, num_kv_heads * head_dim
    scale = head_dim ** -0.5

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    def lin(x, wq):
        return ref_w4a8_mm(x.float(), *wq)

    def rope(x):  # [n, heads, D]
        c, s = cos.double()[:, None], sin.double()[:, None]
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    res = h.double()
    mlp = torch.zeros_like(res)
    for i, lw in enumerate(layers):
        res = res + mlp
        x = norm(res, lw["input_norm"])
        qkv = lin(x, lw["qkv"])
        if lw.get("qkv_bias") is not None:
            qkv = qkv + lw["qkv_bias"].double()
        q = rope(qkv[:, :qs].reshape(n, num_heads, head_dim))
        k = rope(qkv[:, qs : qs + kvs].reshape(n, num_kv_heads, head_dim))
        v = qkv[:, qs + kvs :].reshape(n, num_kv_heads, head_dim)
        k_cache, v_cache = kv_caches[i]
        bs = k_cache.shape[1]
        for r in range(n):
            slot = int(slot_mapping[r])
            if slot >= 0:
                k_cache[slot // bs, slot % bs] = k[r].float()
                v_cache[slot // bs, slot % bs] = v[r].float()
        if cu_seqlens_q is None:
            att = ref_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)
        else:
            att = ref_prefill_attention(q, k_cache, v_cache, block_table, seq_lens,
                                        cu_seqlens_q, scale)
        res = res + lin(att.reshape(n, qs), lw["o_proj"])
        gate, up = lin(norm(res, lw["post_norm"]), lw["gate_up"]).chunk(2, dim=-1)
        mlp = lin(gate * torch.sigmoid(gate) * up, lw["down"])
    return norm(res + mlp, final_norm)

