"""The image benchmark's model: an Idefics3 / SmolVLM-shaped checkpoint built here, seeded.

No pretrained vision-language model is installable on this machine, so the benchmark saves
one with transformers' own classes (``Idefics3ForConditionalGeneration.save_pretrained``):

- text decoder: SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 kv heads,
  intermediate 1536, rope theta 100000) with its REAL weights, copied from the default GGUF
  (``engine.loader.load_checkpoint`` names them as HF Llama does); the rows of the added
  image tokens are drawn at random (seeded), and the LM head is a copy of the embeddings
  (SmolLM2 ties them; the copy spares the loader a tied Idefics3 layout);
- tokenizer: SmolLM2's plus the Idefics3 processor's image tokens;
- vision tower: SigLIP-style ViT with random (seeded) weights, ``VisionShape`` below;
- processor: ``Idefics3Processor`` with image splitting, SmolVLM's chat template.

This measures the serving system (placement, caching, transfer, batching), not model quality:
the shapes are chosen so that one image costs ~0.1-0.5 s to encode on one core (see
bench/README.md, "Images: E-P-D vs EP-D vs colocated").
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# HuggingFaceTB/SmolVLM-Instruct's template: parts in order, <image> where an image goes.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_EXTRA_TOKENS = (
    ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)
_BUILD_VERSION = 1  # bump when the files written change, so stale directories are rebuilt


@dataclass(frozen=True)
class VisionShape:
    """The vision tower and the processor's image sizes.

    An image is resized to ``longest_edge`` px on its longer side, cut into ``tile_px`` tiles
    (up to (longest_edge / tile_px)^2 of them) plus one global tile; each tile is
    (tile_px / patch_px)^2 patches, pixel-shuffled by ``scale_factor`` into
    ``tokens_per_tile`` prompt tokens.
    """

    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 6
    num_heads: int = 6
    tile_px: int = 256
    patch_px: int = 16
    scale_factor: int = 4
    longest_edge: int = 512

    def __post_init__(self) -> None:
        side = self.tile_px // self.patch_px
        if self.tile_px % self.patch_px or side % self.scale_factor:
            raise ValueError(f"tile/patch/scale do not divide: {self}")
        if self.longest_edge % self.tile_px or self.hidden_size % self.num_heads:
            raise ValueError(f"longest_edge must be a multiple of tile_px: {self}")

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile_px // self.patch_px) ** 2 // self.scale_factor**2

    @property
    def max_tiles(self) -> int:
        """Tiles of a square image: the split grid plus the global tile."""
        return (self.longest_edge // self.tile_px) ** 2 + 1


def _tokenizer():
    """A private copy of SmolLM2's tokenizer with the Idefics3 image tokens added."""
    from scission.engine.tokenizer import default_model_path, load_tokenizer

    tok = copy.deepcopy(load_tokenizer(default_model_path()).hf)
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_EXTRA_TOKENS},
                           replace_extra_special_tokens=False)
    return tok


def _configs(shape: VisionShape, tok, text_cfg):
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=text_cfg.hidden_size,
        intermediate_size=text_cfg.intermediate_size, num_hidden_layers=text_cfg.num_layers,
        num_attention_heads=text_cfg.num_heads, num_key_value_heads=text_cfg.num_kv_heads,
        max_position_embeddings=text_cfg.max_position_embeddings,
        rope_theta=text_cfg.rope_theta, rms_norm_eps=text_cfg.rms_norm_eps,
        tie_word_embeddings=False)
    vision = Idefics3VisionConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        image_size=shape.tile_px, patch_size=shape.patch_px)
    return Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          scale_factor=shape.scale_factor,
                          image_token_id=tok.convert_tokens_to_ids("<image>"),
                          tie_word_embeddings=False, pad_token_id=tok.pad_token_id)


def _copy_text_weights(model, text_state: dict[str, torch.Tensor]) -> None:
    """SmolLM2's decoder into ``model.model.text_model``; its embeddings (and a copy as the
    LM head) into the first rows, the added tokens' rows keep their seeded random init."""
    text_model = model.model.text_model
    embed = text_state["model.embed_tokens.weight"]  # [49152, hidden]
    layers = {k.removeprefix("model."): v for k, v in text_state.items()
              if k != "model.embed_tokens.weight"}
    with torch.no_grad():
        missing, unexpected = text_model.load_state_dict(layers, strict=False)
        assert not unexpected, f"unexpected text weights {unexpected[:4]}"
        assert missing == ["embed_tokens.weight"], f"text weights missing: {missing[:4]}"
        text_model.embed_tokens.weight[: embed.shape[0]].copy_(embed)
        model.lm_head.weight.copy_(text_model.embed_tokens.weight)


def build_checkpoint(path: Path, shape: VisionShape = VisionShape(), seed: int = 0) -> Path:
    """Save the benchmark's Idefics3 checkpoint (model, tokenizer, processor) into ``path``.

    Reuses ``path`` when it holds a build of the same shape, seed and version (a marker file
    ``scission_bench_build.json``). Returns ``path``.
    """
    from transformers import (
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    from scission.engine.loader import load_checkpoint
    from scission.engine.tokenizer import default_model_path

    marker = path / "scission_bench_build.json"
    stamp = {"version": _BUILD_VERSION, "seed": seed, "vision": asdict(shape)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        logger.info("reusing the benchmark checkpoint at %s", path)
        return path
    tok = _tokenizer()
    text_cfg, text_state = load_checkpoint(default_model_path())
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(_configs(shape, tok, text_cfg)).eval()
    _copy_text_weights(model, text_state)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": shape.longest_edge},
        max_image_size={"longest_edge": shape.tile_px})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=shape.tokens_per_tile,
                                  chat_template=SMOLVLM_CHAT_TEMPLATE)
    processor.save_pretrained(path)
    marker.write_text(json.dumps(stamp))
    logger.info("wrote the benchmark checkpoint to %s (%s)", path, shape)
    return path
