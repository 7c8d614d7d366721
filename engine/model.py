"""Llama-family decoder (Llama, SmolLM, Qwen2) over a paged KV cache.

The batch is flattened: ``input_ids`` and ``positions`` are ``[num_tokens]`` across all
requests of the step; attention reads and writes the paged cache through an
``AttentionBackend`` planned once per step. Q/K/V and gate/up projections are fused
into single matmuls (one GEMM instead of three / two on the hot path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scission.engine.attention import AttentionBackend
from scission.engine.config import ModelConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache), NHD


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019), computed in float32. x: [num_tokens, hidden].

    Same float32 operations in the same order as HF Llama's ``LlamaRMSNorm`` (mean of
    squares, ``rsqrt(var + eps)``, times x, times weight), so float32 results are bitwise
    equal; in place where the intermediate is ours, to allocate less per call.
    """
    if x.dtype == torch.float32:
        return (x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()).mul_(weight)
    xf = x.float()
    xf = xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return xf.mul_(weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + x`` (rounded to the model dtype, as HF's residual stream), then
    ``(rms_norm(h), h)``. x, residual: [num_tokens, hidden]; returns two new tensors."""
    h = residual + x
    return rms_norm(h, weight, eps), h


def rope_cos_sin_table(max_positions: int, head_dim: int, theta: float,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_positions, head_dim // 2]`` for the neox layout (RoFormer, Su et al.
    2021), computed once; row ``p`` is position ``p``. Float32 math as HF's
    ``LlamaRotaryEmbedding`` (``inv_freq * position`` in float32, then cos/sin, then cast),
    so indexing the table gives the same values as computing them per step."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotary embedding. x: [num_tokens, num_heads, head_dim] (any strides);
    cos/sin: [num_tokens, D/2]. Returns a new contiguous tensor of x's shape."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        e = dict(dtype=dtype)
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size, **e), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(cfg.hidden_size, **e), requires_grad=False)
        self.qkv = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias, **e)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False, **e)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, **e)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, **e)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, h, cos, sin, kv, attn: AttentionBackend
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's normed input, h: the residual stream (both [num_tokens, hidden]).
        Returns ``(mlp_out, h)``: the residual add of ``mlp_out`` is left to the next norm
        (``add_rms_norm``), which does it with the normalization in one call."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self.qkv(x)  # [T, q + 2 kv]
        # q and k are adjacent columns: one rotary call over their (H + H_kv) heads.
        qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(-1, nh + nkv, hd), cos, sin)
        q, k = qk[:, :nh], qk[:, nh:]
        v = qkv[:, self.q_size + self.kv_size :].view(-1, nkv, hd)
        o = attn.run(q, k, v, kv[0], kv[1], self.scale)  # [num_tokens, H, D]
        x, h = add_rms_norm(self.o_proj(o.reshape(-1, self.q_size)), h, self.post_norm,
                            cfg.rms_norm_eps)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate).mul_(up)), h


class LlamaForCausalLM(nn.Module):
    """Decoder stack + LM head. Call ``forward`` then ``compute_logits`` on selected rows."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        self.requires_grad_(False)
        cos, sin = rope_cos_sin_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta,
                                      dtype)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_positions, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        # Graph mode (engine/compile.py CompiledDecoder) replaces forward_embeds when set.
        self.compiled = None
        # Native decode (engine/native_decode.py NativeDecoder) runs pure-decode steps when set.
        self.native_decode = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: KVCaches,
        attn: AttentionBackend,
        mm_rows: torch.Tensor | None = None,  # [num_mm_rows] int64, rows taking image embeds
        mm_embeds: torch.Tensor | None = None,  # [num_mm_rows, hidden_size], model dtype
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        h = self.embed(input_ids)
        if mm_rows is not None:  # image positions: the vision encoder's output, not the table
            h.index_copy_(0, mm_rows, mm_embeds.to(h.dtype))
        md = getattr(attn, "metadata", None)
        if self.native_decode is not None and md is not None and mm_rows is None \
                and self.native_decode.handles(md):
            return self.native_decode.forward_embeds(h, positions, md)
        run = self.compiled.forward_embeds if self.compiled is not None else self.forward_embeds
        return run(h, positions, kv_caches, attn)

    def forward_embeds(self, h: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                       attn: AttentionBackend) -> torch.Tensor:
        """The decoder stack from input embeddings h [num_tokens, hidden_size]."""
        eps = self.cfg.rms_norm_eps
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [num_tokens, D/2]
        x = rms_norm(h, self.layers[0].input_norm, eps)
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i > 0:
                x, h = add_rms_norm(x, h, layer.input_norm, eps)
            x, h = layer(x, h, cos, sin, kv, attn)
        return add_rms_norm(x, h, self.norm, eps)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden_size] -> logits [n, vocab_size] float32."""
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up.

        Raises:
            KeyError: a required weight is missing.
        """
        cast = lambda t: t.to(self.dtype)  # noqa: E731
        self.embed.weight.copy_(cast(state["model.embed_tokens.weight"]))
        self.norm.copy_(cast(state["model.norm.weight"]))
        head = state.get("lm_head.weight")
        self.lm_head.weight.copy_(cast(head if head is not None and not self.cfg.tie_word_embeddings
                                       else state["model.embed_tokens.weight"]))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            layer.input_norm.copy_(cast(state[p + "input_layernorm.weight"]))
            layer.post_norm.copy_(cast(state[p + "post_attention_layernorm.weight"]))
            qkv = [state[a + f"{n}_proj.weight"] for n in "qkv"]
            layer.qkv.weight.copy_(cast(torch.cat(qkv, 0)))
            if self.cfg.attention_bias:
                layer.qkv.bias.copy_(cast(torch.cat([state[a + f"{n}_proj.bias"] for n in "qkv"])))
            layer.o_proj.weight.copy_(cast(state[a + "o_proj.weight"]))
            gate_up = [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]
            layer.gate_up.weight.copy_(cast(torch.cat(gate_up, 0)))
            layer.down.weight.copy_(cast(state[p + "mlp.down_proj.weight"]))
