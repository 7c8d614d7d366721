"""Graph mode: the decoder's dense parts compiled with ``torch.compile``, attention left eager.

Piecewise, as vLLM's piecewise CUDA-graph compile: the paged-cache attention (``attn.run``,
whose Python plans per batch) stays outside the graphs; everything between two attention calls
is one compiled function, so a forward is ``first -> attn -> mid -> attn -> ... -> last``::

    first(h)        rms_norm -> qkv -> rope                                     -> q, k, v
    mid(o, h)       o_proj -> +h, rms_norm -> gate_up -> silu * up -> down
                    -> +h, next layer's rms_norm -> qkv -> rope                   -> q, k, v, h
    last(o, h)      o_proj -> +h, rms_norm -> MLP -> +h, final rms_norm            -> hidden

Pure-decode steps on CPU go further: the attention read is inside the graphs too
(``mid_decode``: attention of layer i, then ``mid``), written as gather + multiply + sum over
``kv_slots [n, L]`` so inductor fuses the gather into the reductions and reads the paged cache
in place (the eager backend copies every request's blocks per layer); only the K/V write
(``index_copy_``) runs between the graphs. ``SCISSION_GRAPH_DECODE_ATTN=0`` turns that off.

The weights are arguments, not constants, so one compiled graph serves every layer (same
shapes and dtypes pass the same guards). On CPU (inductor's C++ backend) the token dimension is
dynamic (``maybe_mark_dynamic``): one graph for decode batches and prefill chunks of any
size, no padding (dynamo still specializes a size-1 batch, so single-stream decode gets its
own static graph). The elementwise chains (RMSNorm + residual, rope, silu * up) become one
fused C++ loop each; the matmuls stay in the BLAS library.

On CUDA the same pieces are compiled with ``mode="reduce-overhead"`` (CUDA graphs), which need
static shapes: decode batches are padded to ``CUDA_GRAPH_BUCKETS`` by the caller of
``pad_tokens``. That path is not exercised on this CPU-only machine.

Compiled artifacts go to inductor's on-disk FX graph cache under ``cache_dir()`` (env
``SCISSION_CACHE_DIR``, default ``~/.cache/scission``), so a second start skips the C++ builds.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.nn.functional as F

from scission.engine.attention import slot_rows, strided_rows
from scission.engine.model import KVCaches, LlamaForCausalLM, add_rms_norm, apply_rope, rms_norm
from scission.kernels.cpu_build import cache_dir

logger = logging.getLogger(__name__)

CUDA_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RECOMPILE_LIMIT = 64  # graphs per piece per process (CompiledDecoder.__init__)


def use_disk_cache() -> None:
    """Point inductor's caches at ``cache_dir()/inductor`` unless the user chose a folder."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def pad_tokens(num_tokens: int, buckets: tuple[int, ...] = CUDA_GRAPH_BUCKETS) -> int:
    """Smallest bucket >= num_tokens, or num_tokens itself past the largest bucket."""
    for b in buckets:
        if b >= num_tokens:
            return b
    return num_tokens


def _dense_linear(x, weight, bias):
    return F.linear(x, weight, bias)


def _linear_fn(module: torch.nn.Module):
    """The pure ``(x, *args)`` function a graph calls for one kind of linear, and how to get
    a layer's ``args``: ``F.linear`` for ``nn.Linear``; ``graph_linear`` / ``graph_args`` for
    the quantized modules (engine/quant.py), whose kernels run inside the graph."""
    if type(module) is torch.nn.Linear:
        return _dense_linear, lambda m: (m.weight, m.bias)
    return module.graph_linear, lambda m: m.graph_args()


LINEARS = ("qkv", "o_proj", "gate_up", "down")


def _pieces(model: LlamaForCausalLM):
    """The three graph pieces as pure functions of (activations, weights); each linear's
    weights are one tuple argument (``_linear_fn``)."""
    cfg = model.cfg
    nh, nkv, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    q_size, kv_size = nh * hd, nkv * hd
    lin_qkv, lin_o, lin_gate_up, lin_down = (_linear_fn(getattr(model.layers[0], a))[0]
                                             for a in LINEARS)

    def qkv_rope(x, cos, sin, qkv_w):
        qkv = lin_qkv(x, *qkv_w)
        qk = apply_rope(qkv[:, : q_size + kv_size].view(-1, nh + nkv, hd), cos, sin)
        v = qkv[:, q_size + kv_size :].reshape(-1, nkv, hd)
        return qk[:, :nh], qk[:, nh:], v

    def mlp_block(o, h, o_w, post_w, gate_up_w, down_w):
        x, h = add_rms_norm(lin_o(o.reshape(-1, q_size), *o_w), h, post_w, eps)
        gate, up = lin_gate_up(x, *gate_up_w).chunk(2, dim=-1)
        return lin_down(F.silu(gate) * up, *down_w), h

    def first(h, cos, sin, in_w, qkv_w):
        return qkv_rope(rms_norm(h, in_w, eps), cos, sin, qkv_w)

    def mid(o, h, cos, sin, o_w, post_w, gate_up_w, down_w, in_w, qkv_w):
        m, h = mlp_block(o, h, o_w, post_w, gate_up_w, down_w)
        x, h = add_rms_norm(m, h, in_w, eps)
        q, k, v = qkv_rope(x, cos, sin, qkv_w)
        return q, k, v, h

    def last(o, h, o_w, post_w, gate_up_w, down_w, norm_w):
        m, h = mlp_block(o, h, o_w, post_w, gate_up_w, down_w)
        return add_rms_norm(m, h, norm_w, eps)[0]

    gqa, scale = nh // nkv, 1.0 / math.sqrt(hd)

    def decode_attention(q, k_rows, v_rows, kv_rows, kv_bias):
        """q [n, H, D]; k_rows / v_rows a layer's cache as ``strided_rows`` [R, H_kv, D];
        kv_rows [n, L] int64 rows of each request's context (padding: any valid row), kv_bias
        [n, L] 0 / -inf. Written as gather + multiply + sum so inductor fuses the gather into
        the reductions (the cache rows are read in place, never copied); the rows are
        computed once per step (``slot_rows``), so the kernel does no integer division."""
        n = q.shape[0]
        k = k_rows[kv_rows]  # [n, L, H_kv, D]
        v = v_rows[kv_rows]
        qf = q.reshape(n, 1, nkv, gqa, hd).float()  # float32 math, as SDPA accumulates
        s = (qf * k[:, :, :, None, :].float()).sum(-1) * scale + kv_bias[:, :, None, None]
        p = torch.softmax(s, dim=1)  # [n, L, H_kv, gqa]
        o = (p[..., None] * v[:, :, :, None, :].float()).sum(1)
        return o.to(q.dtype).reshape(n, nh, hd)

    def mid_decode(q, k_rows, v_rows, kv_rows, kv_bias, h, cos, sin, *weights):
        return mid(decode_attention(q, k_rows, v_rows, kv_rows, kv_bias), h, cos, sin,
                   *weights)

    def last_decode(q, k_rows, v_rows, kv_rows, kv_bias, h, *weights):
        return last(decode_attention(q, k_rows, v_rows, kv_rows, kv_bias), h, *weights)

    return first, mid, last, mid_decode, last_decode


def compilable(model: LlamaForCausalLM) -> bool:
    """Every decoder linear is ``nn.Linear`` or has ``graph_linear`` / ``graph_args``, one kind
    per projection across layers (one compiled graph serves every layer)."""
    for a in LINEARS:
        kinds = {type(getattr(layer, a)) for layer in model.layers}
        if len(kinds) != 1:
            return False
        kind = kinds.pop()
        if kind is not torch.nn.Linear and not hasattr(kind, "graph_linear"):
            return False
    return True


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


class CompiledDecoder:
    """``forward_embeds`` of a ``LlamaForCausalLM`` through compiled pieces (module docstring).

    Compiles lazily on the first call of each shape; ``warmup`` compiles ahead of serving.
    """

    def __init__(self, model: LlamaForCausalLM) -> None:
        assert compilable(model), "graph mode needs nn.Linear or graph_linear layers"
        use_disk_cache()
        # Dynamo caches graphs per code object, and every CompiledDecoder compiles the same
        # ``_pieces`` functions: each engine in a process (one per dtype or linear kind, as in
        # ``bench engine`` or the tests) adds 2-3 entries per piece. The default limit (8)
        # would make the fifth engine's warm-up fail (fullgraph=True).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   RECOMPILE_LIMIT)
        self.model = model
        self.cuda = next(model.parameters()).is_cuda
        opts = dict(fullgraph=True, dynamic=False if self.cuda else None,
                    mode="reduce-overhead" if self.cuda else None)
        (self.first, self.mid, self.last, self.mid_decode, self.last_decode) = (
            torch.compile(f, **opts) for f in _pieces(model))
        # CPU pure-decode steps: attention inside the graphs (reads the cache in place).
        self.fuse_decode_attention = not self.cuda and os.environ.get(
            "SCISSION_GRAPH_DECODE_ATTN", "1") == "1"
        self.compile_s = 0.0  # wall time of warmup() calls
        # Per layer: each linear's weight tuple (qkv, o_proj, gate_up, down), built once.
        getters = [_linear_fn(getattr(model.layers[0], a))[1] for a in LINEARS]
        self.layer_args = [tuple(g(getattr(layer, a)) for g, a in zip(getters, LINEARS, strict=True))
                           for layer in model.layers]
        self._row_views: tuple[tuple, list, int] | None = None  # (key, per layer, pitch)

    def row_views(self, kv_caches: KVCaches) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Each layer's (K, V) cache as ``strided_rows`` views and the block pitch, built once
        per cache (the views are fixed windows on the cache tensor)."""
        kc = kv_caches[0][0]
        key = (kc.data_ptr(), tuple(kc.shape), tuple(kc.stride()), len(kv_caches))
        if self._row_views is None or self._row_views[0] != key:
            views = [(strided_rows(k)[0], strided_rows(v)[0]) for k, v in kv_caches]
            self._row_views = (key, views, strided_rows(kc)[1])
        return self._row_views[1], self._row_views[2]

    def forward_embeds(self, h: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                       attn) -> torch.Tensor:
        """Same contract as ``LlamaForCausalLM.forward_embeds``: h [num_tokens, hidden]."""
        m = self.model
        n = h.shape[0]
        if self.cuda:  # CUDA graphs: static shapes, decode batches padded to a bucket
            padded = pad_tokens(n)
            if padded > CUDA_GRAPH_BUCKETS[-1]:
                return m.forward_embeds(h, positions, kv_caches, attn)
            torch.compiler.cudagraph_mark_step_begin()
            h = F.pad(h, (0, 0, 0, padded - n))
            positions = F.pad(positions, (0, padded - n))
        cos, sin = m.rope_cos[positions], m.rope_sin[positions]
        mark = _mark_tokens_dynamic if not self.cuda else (lambda *_: None)
        mark(h, cos, sin)
        md = getattr(attn, "metadata", None)
        if self.fuse_decode_attention and md is not None and md.is_pure_decode:
            return self._decode_forward(h, cos, sin, kv_caches, md)
        layers = m.layers
        args = self.layer_args
        q, k, v = self.first(h, cos, sin, layers[0].input_norm, args[0][0])
        for i, (layer, kv) in enumerate(zip(layers, kv_caches, strict=True)):
            o = attn.run(q[:n], k[:n], v[:n], kv[0], kv[1], layer.scale)
            if o.shape[0] != h.shape[0]:
                o = F.pad(o, (0, 0, 0, 0, 0, h.shape[0] - o.shape[0]))
            mark(o)
            w = (args[i][1], layer.post_norm, args[i][2], args[i][3])
            if i + 1 < len(layers):
                q, k, v, h = self.mid(o, h, cos, sin, *w, layers[i + 1].input_norm,
                                      args[i + 1][0])
            else:
                h = self.last(o, h, *w, m.norm)
        return h[:n]

    def _decode_forward(self, h, cos, sin, kv_caches: KVCaches, md) -> torch.Tensor:
        """Pure decode on CPU: per layer one compiled call (attention + dense) and the K/V
        write (``index_copy_`` into the row views) between calls. Cache rows of the context
        and of the new tokens are computed once for all layers (``slot_rows``)."""
        m, layers = self.model, self.model.layers
        bs, n = md.block_size, h.shape[0]
        views, pitch = self.row_views(kv_caches)
        pos = torch.arange(md.max_seq_len)
        table = md.block_table.to(torch.int64)
        kv_rows = table[:, pos // bs] * pitch + pos % bs  # [n, L]: slot_rows of the context
        kv_bias = torch.zeros(n, md.max_seq_len)  # float32
        kv_bias.masked_fill_(pos[None, :] >= md.seq_lens[:, None], float("-inf"))
        _mark_tokens_dynamic(kv_rows, kv_bias)
        torch._dynamo.maybe_mark_dynamic(kv_rows, 1)
        torch._dynamo.maybe_mark_dynamic(kv_bias, 1)
        new_rows = slot_rows(md.slot_mapping, bs, pitch)  # [n]: no padding slots in decode
        args = self.layer_args
        q, k, v = self.first(h, cos, sin, layers[0].input_norm, args[0][0])
        for i, (layer, (k_rows, v_rows)) in enumerate(zip(layers, views, strict=True)):
            k_rows.index_copy_(0, new_rows, k)
            v_rows.index_copy_(0, new_rows, v)
            w = (args[i][1], layer.post_norm, args[i][2], args[i][3])
            if i + 1 < len(layers):
                q, k, v, h = self.mid_decode(q, k_rows, v_rows, kv_rows, kv_bias, h, cos, sin,
                                             *w, layers[i + 1].input_norm, args[i + 1][0])
            else:
                h = self.last_decode(q, k_rows, v_rows, kv_rows, kv_bias, h, *w, m.norm)
        return h

    def warmup(self, run_step, sizes: tuple[int, ...]) -> float:
        """Compile ahead: ``run_step(num_tokens)`` runs one forward of that many tokens for
        each size. Returns (and adds to ``compile_s``) the wall seconds it took."""
        start = time.perf_counter()
        for s in sizes:
            run_step(s)
        took = time.perf_counter() - start
        self.compile_s += took
        logger.info("graph mode: compiled for token counts %s in %.1f s (cache %s)", sizes,
                    took, os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        return took


def enable_graph_mode(model: LlamaForCausalLM, kv_cache, attn,
                      warmup_tokens: tuple[int, ...] = (1, 2)) -> CompiledDecoder | None:
    """Install a ``CompiledDecoder`` on ``model`` and compile it now (one forward per entry of
    ``warmup_tokens``: 1 = the static single-token graph, 2 = the dynamic graph every larger
    batch uses). Returns None (model stays eager) when ``compilable`` is false.

    With native decode on (``model.native_decode``, engine/native_decode.py) every text step
    runs in C and never reaches the graphs: no warm-up then, and steps with image embeddings
    (the only ones left to torch) compile at their first call.

    The warm-up forwards write garbage K/V into block 0 and then zero it again, so call this
    before any request holds blocks.
    """
    if not compilable(model):
        logger.warning("graph mode skipped: a decoder linear has no graph form; running eager")
        return None
    from scission.engine.attention import AttentionMetadata

    compiled = CompiledDecoder(model)
    model.compiled = compiled
    if getattr(model, "native_decode", None) is not None:
        logger.info("graph mode: text steps run native (engine/native_decode.py); graphs "
                    "compile at the first step with image embeddings")
        return compiled
    bs = kv_cache.block_size
    device = kv_cache.tensor.device

    def run_step(n: int) -> None:  # n requests decoding their second token, all in block 0
        i32 = dict(dtype=torch.int32, device=device)
        md = AttentionMetadata(
            cu_seqlens_q=torch.arange(n + 1, **i32), seq_lens=torch.full((n,), 2, **i32),
            block_table=torch.zeros(n, 1, **i32),
            slot_mapping=torch.ones(n, dtype=torch.int64, device=device), max_seqlen_q=1,
            max_seq_len=2, block_size=bs, query_lens=(1,) * n, seq_lens_host=(2,) * n,
            slots_all_valid=True)
        attn.plan(md)
        ids = torch.zeros(n, dtype=torch.int64, device=device)
        with torch.inference_mode():
            model(ids, torch.ones_like(ids), kv_cache.layers, attn)

    compiled.warmup(run_step, warmup_tokens)
    with torch.inference_mode():
        kv_cache.zero_block(0)
    return compiled
