"""Native decode: a w4a8 model's steps as one C call (kernels/llama_decode.py).

With ``weight_quantization="w4a8"`` every decoder linear is a ``W4A8Linear`` whose kernel
already runs in C; a torch decode step at batch 1 still spends about two thirds of its time
around those kernels (121 op calls, graph guards or eager dispatch of ~30 small ops a layer,
Python). ``NativeDecoder`` hands the whole decoder stack of a step to ``LlamaDecodeStep``,
reading the same packed weights, norms and paged KV cache in place: pure-decode steps, and
since 2026-12-01 prefill and mixed steps too (``llama_forward_step``: decode tokens take the
decode attention, prefill chunks the C prefill attention). Every row's arithmetic is then
the same whatever shares its step, so a request's greedy tokens do not depend on when other
requests arrive. Steps with image embeddings keep the torch path (eager or graph mode). The
LM head and sampling stay in torch (engine/model_runner.py), so the rescored head and every
sampling option are unchanged.

The arithmetic is the torch w4a8 model's (same codes, scales, int8 activation rule, float32
elsewhere) in another float32 summation order; accuracy against HF is stated in
tests/engine/test_quant_engine.py, and tests/engine/test_native_decode.py checks it against
the torch w4a8 path.
"""

from __future__ import annotations

import logging

import torch

from scission.engine.attention import AttentionMetadata
from scission.engine.kv_cache import KVCache
from scission.engine.model import LlamaForCausalLM
from scission.engine.quant import DECODER_LINEARS, W4A8_GEMM_MIN_ROWS, W4A8Linear

logger = logging.getLogger(__name__)


def native_decode_unsupported(model: LlamaForCausalLM, kv_cache: KVCache) -> str | None:
    """Why ``NativeDecoder`` cannot run this model and cache, or None when it can."""
    if model.dtype != torch.float32 or kv_cache.dtype != torch.float32:
        return (f"needs a float32 model and KV cache, got {model.dtype} and "
                f"{kv_cache.dtype}")
    if kv_cache.tensor.device.type != "cpu":
        return f"runs on CPU, the KV cache is on {kv_cache.tensor.device}"
    for i, layer in enumerate(model.layers):
        for a in DECODER_LINEARS:
            if type(getattr(layer, a)) is not W4A8Linear:
                return f"layer {i} {a} is {type(getattr(layer, a)).__name__}, not W4A8Linear"
        if layer.o_proj.bias is not None or layer.gate_up.bias is not None \
                or layer.down.bias is not None:
            return f"layer {i} has a bias outside qkv"
    return None


class NativeDecoder:
    """Runs the steps of ``model`` over ``kv_cache`` through ``LlamaDecodeStep``.

    Every text step is native (``handles``). Its linears run ``w4a8_mm`` below
    ``gemm_min_rows`` tokens and ``w4a8_gemm`` from there on (``W4A8_GEMM_MIN_ROWS``, where
    the torch path's ``W4A8Linear`` switches too); a row gets the same bits from either.

    Raises:
        ValueError: ``native_decode_unsupported`` gives a reason, or a tensor does not fit.
        KernelBuildError: the C step cannot be built here.
    """

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache,
                 gemm_min_rows: int = W4A8_GEMM_MIN_ROWS) -> None:
        reason = native_decode_unsupported(model, kv_cache)
        if reason:
            raise ValueError(f"native decode: {reason}")
        from scission.kernels.llama_decode import LINEARS, LayerWeights, LlamaDecodeStep

        cfg = model.cfg
        layers = [LayerWeights(qkv=layer.qkv.blocks, o_proj=layer.o_proj.blocks,
                               gate_up=layer.gate_up.blocks, down=layer.down.blocks,
                               input_norm=layer.input_norm, post_norm=layer.post_norm,
                               qkv_bias=layer.qkv.bias,
                               tiles={name: (lin.tile_codes, lin.tile_scales, lin.tile_mins)
                                      for name in LINEARS
                                      for lin in (getattr(layer, name),)})
                  for layer in model.layers]
        self.model = model
        self.step = LlamaDecodeStep(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
            layers=layers, final_norm=model.norm, kv_caches=kv_cache.layers,
            gemm_min_rows=gemm_min_rows)

    def handles(self, md: AttentionMetadata) -> bool:
        """True for every step: decode tokens, prefill chunks and mixes of both (the model
        keeps steps with image embeddings on the torch path)."""
        return True

    def forward_embeds(self, h: torch.Tensor, positions: torch.Tensor,
                       md: AttentionMetadata) -> torch.Tensor:
        """h ``[n, hidden]`` float32 input embeddings of a step's tokens (request r's rows
        ``md.cu_seqlens_q[r] ..``), positions ``[n]`` int64 -> the final-normed hidden states
        ``[n, hidden]``. Writes the step's K/V into the cache."""
        m = self.model
        return self.step(h, m.rope_cos[positions], m.rope_sin[positions], md.block_table,
                         md.seq_lens, md.slot_mapping,
                         cu_seqlens_q=None if md.is_pure_decode else md.cu_seqlens_q)


def enable_native_decode(model: LlamaForCausalLM, kv_cache: KVCache) -> NativeDecoder | None:
    """Install a ``NativeDecoder`` on ``model`` (``model.native_decode``) when it can run;
    logs why not and returns None otherwise (the torch path serves every step then).

    Raises:
        KernelBuildError: the C step cannot be built here.
    """
    try:
        model.native_decode = NativeDecoder(model, kv_cache)
    except ValueError as e:
        logger.warning("%s; decoding through torch", e)
        return None
    logger.info("native decode on: each step runs as one C call (kernels/llama_decode.c)")
    return model.native_decode
