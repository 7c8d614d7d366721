"""``load_vision``: the vision encoder and the image processor of a VLM checkpoint directory.

The text decoder of the same directory comes from ``engine.loader.load_checkpoint``; both
read the safetensors files and split them with ``engine.loader.split_vlm_state``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from scission.engine.loader import (
    is_vlm_text_tensor,
    read_safetensors_dir,
    read_vlm_config,
    split_vlm_state,
    vlm_architecture,
)
from scission.engine.mm_processor import MultimodalProcessor
from scission.engine.vision import VisionEncoder
from scission.engine.vision_idefics3 import Idefics3VisionConfig, Idefics3VisionEncoder
from scission.engine.vision_llava import LlavaVisionConfig, LlavaVisionEncoder

logger = logging.getLogger(__name__)


def build_vision_encoder(hf_config: dict, dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """An uninitialised encoder for a VLM config.json dict.

    Raises:
        ValueError: not a supported VLM architecture, or an unsupported vision setting.
    """
    arch = vlm_architecture(hf_config)
    if arch == "LlavaForConditionalGeneration":
        return LlavaVisionEncoder(LlavaVisionConfig.from_hf(hf_config), dtype)
    if arch == "Idefics3ForConditionalGeneration":
        return Idefics3VisionEncoder(Idefics3VisionConfig.from_hf(hf_config), dtype)
    raise ValueError(f"not a supported vision-language architecture: "
                     f"{hf_config.get('architectures')}")


def load_vision(path: str, dtype: torch.dtype = torch.float32
                ) -> tuple[VisionEncoder, MultimodalProcessor] | None:
    """Vision encoder (weights loaded, eval, CPU, ``dtype``) and processor of an HF VLM
    checkpoint directory; None for a text-only checkpoint (a ``.gguf`` file, or a directory
    whose architecture is not a VLM).

    ``model_id`` (for image hashes): config.json's ``_name_or_path``, else the directory name.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported vision settings, or the processor disagrees with the model
            (image token id).
        KeyError: vision weights missing from the checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    cfg_path = Path(path) / "config.json"
    if not os.path.isdir(path) or not cfg_path.exists():
        return None
    if vlm_architecture(json.loads(cfg_path.read_text())) is None:
        return None
    hf, model_id = read_vlm_config(Path(path))
    encoder = build_vision_encoder(hf, dtype)
    vision_only = read_safetensors_dir(Path(path), keep=lambda n: not is_vlm_text_tensor(n))
    _text, vision_state = split_vlm_state(vision_only)
    encoder.load_hf_state_dict(vision_state)
    encoder.eval()
    processor = MultimodalProcessor.from_pretrained(path, model_id=model_id)
    model_image_token_id = hf.get("image_token_id", hf.get("image_token_index"))
    if model_image_token_id is not None and model_image_token_id != processor.image_token_id:
        raise ValueError(f"{path}: processor image token id {processor.image_token_id} != "
                         f"model's {model_image_token_id}")
    logger.info("vision encoder %s for %s: %s", type(encoder).__name__, model_id, dtype)
    return encoder, processor
