"""Tiny random-weight vision-language checkpoints built with transformers' own classes
(not collected: no test_ prefix).

Each builder saves, into one directory, the model (float32 safetensors), the tokenizer (the
default model's SmolLM2 tokenizer plus the processor's added special tokens) and the
processor (image processor + chat template rendering an image part as the image marker).
Nothing is downloaded; weights are seeded, so two builds give the same files.

Shapes (small enough for a CPU test in a few seconds):
    text:    hidden 64, 2 layers, 4 heads / 2 kv heads, vocab = len(tokenizer)
    LLaVA:   CLIP ViT 30 px / patch 6 -> 25 patches (+CLS), hidden 32, 2 layers,
             vision_feature_layer -2, "default" strategy -> 25 image tokens
    Idefics3: tiles of 32 px / patch 4 -> 64 patches, scale_factor 2 -> 16 tokens a tile;
             longest_edge 64 -> up to 2 x 2 tiles plus the global image
"""

from __future__ import annotations

import os

import torch

# SmolVLM-Instruct's chat template and the Idefics3 processor's added tokens: one copy, shared
# with the image benchmark's checkpoint.
from scission.bench.images_model import IDEFICS3_EXTRA_TOKENS, SMOLVLM_CHAT_TEMPLATE

# llava-hf/llava-1.5-7b-hf's template: images first, then the text parts of a message.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

def _text_config(vocab_size: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, **extra)


def _tokenizer(special_tokens: list[str]):
    """A private copy of the default model's tokenizer with ``special_tokens`` added (the
    cached shared tokenizer is never mutated)."""
    import copy

    from scission.engine.tokenizer import default_model_path, load_tokenizer

    tok = copy.deepcopy(load_tokenizer(default_model_path()).hf)
    tok.add_special_tokens({"additional_special_tokens": special_tokens},
                           replace_extra_special_tokens=False)
    return tok


def _widen_lm_head(model) -> None:
    with torch.no_grad():  # random init has tiny logits; widen them so argmax is meaningful
        model.lm_head.weight.mul_(20)


def make_tiny_llava(path: str | os.PathLike) -> str:
    """Save a tiny ``LlavaForConditionalGeneration`` checkpoint (CLIP tower, MLP projector,
    Llama text model), its tokenizer and its ``LlavaProcessor`` into ``path``.

    Returns:
        ``str(path)``.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=30, patch_size=6,
                              hidden_act="quick_gelu", projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(len(tok)),
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=25,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    _widen_lm_head(model)
    model.save_pretrained(path, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 30},
                                         crop_size={"height": 30, "width": 30})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=6,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return str(path)


def make_tiny_idefics3(path: str | os.PathLike) -> str:
    """Save a tiny ``Idefics3ForConditionalGeneration`` checkpoint (SigLIP-style vision
    transformer, pixel-shuffle connector, Llama text model), its tokenizer and its
    ``Idefics3Processor`` (image splitting on) into ``path``.

    Returns:
        ``str(path)``.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    tok = _tokenizer(IDEFICS3_EXTRA_TOKENS)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=32, patch_size=4)
    config = Idefics3Config(vision_config=vision.to_dict(),
                            text_config=_text_config(len(tok)).to_dict(), scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"),
                            tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    _widen_lm_head(model)
    model.save_pretrained(path, safe_serialization=True)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 64},
                                             max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=16, chat_template=SMOLVLM_CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return str(path)


SHARPEN = 6.0  # text q/k scale: sharper attention makes the tokens depend on the images


def sharpened_checkpoint(src: str, dst: str) -> str:
    """``src``'s tiny VLM with the text decoder's q/k projections scaled by ``SHARPEN``, saved
    (model, tokenizer, processor) into ``dst``. With the random init's near-uniform attention
    the last tokens barely see the images (most greedy tokens stay the same with other
    images); ``test_greedy_tokens_equal_hf`` checks that they no longer do."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    text_model = hf.get_decoder()
    with torch.no_grad():
        for name, p in text_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(SHARPEN)
    hf.save_pretrained(dst, safe_serialization=True)
    AutoProcessor.from_pretrained(src).save_pretrained(dst)
    return dst
