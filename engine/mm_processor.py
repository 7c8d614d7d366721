"""Image bytes -> prompt segment + pixels, through the checkpoint's own HF processor.

Resize, crop, normalize, tiling and the token expansion are the HF processor's
(``AutoProcessor.from_pretrained(checkpoint_dir)``); nothing here re-implements them. The
processor is run on the image marker alone, so its output ``input_ids`` are the image's
segment (LLaVA: ``<image>`` x num_patches; Idefics3: ``<fake_token_around_image><row_1_col_1>
<image>*N ... <global-img><image>*N<fake_token_around_image>``). Both families' segments
start and end with added special tokens, which split text before the tokenizer's
pre-tokenizer runs, so the segment tokenizes the same alone as inside a prompt::

    prompt with markers   | text ids | image_token_id | text ids | image_token_id | ...
    expand_prompt         | text ids | segment 0 ids  | text ids | segment 1 ids  | ...
                                     ^ offsets[0]                ^ offsets[1]

which equals ``processor(text=prompt, images=[...])["input_ids"]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from scission.engine.multimodal import splice_segments

logger = logging.getLogger(__name__)

IMAGE_HASH_VERSION = b"scission-image-hash-v1"
# Processor attributes (beyond the image processor's settings) that change the expansion.
_EXPANSION_ATTRS = ("image_token", "image_seq_len", "patch_size", "num_additional_image_tokens",
                    "vision_feature_select_strategy")


@dataclass(frozen=True, eq=False)
class ImageSegment:
    """One processed image.

    Attributes:
        token_ids: the exact ids the HF processor puts in ``input_ids`` for this image (its
            whole expansion, wrapper tokens included).
        pixel_values: float32, CPU; what ``VisionEncoder.encode`` takes. LLaVA:
            ``[1, 3, H, W]``; Idefics3: the tiles ``[num_tiles, 3, H, W]``.
        num_embeddings: count of ``image_token_id`` in ``token_ids`` (rows ``encode`` returns).
        image_hash: 32-byte blake2b content key (``MultimodalProcessor.image_hash``).
        width, height: the decoded image's size in pixels (after EXIF orientation).
    """

    token_ids: tuple[int, ...]
    pixel_values: torch.Tensor
    num_embeddings: int
    image_hash: bytes
    width: int
    height: int


def decode_image(data: bytes):
    """Pillow RGB image of encoded bytes, EXIF-oriented like HF's ``load_image``.

    Raises:
        ValueError: undecodable, truncated or oversized (decompression bomb) image data.
    """
    from PIL import Image, ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not inside the processor
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {e}") from e


class MultimodalProcessor:
    """The checkpoint's HF processor, one image at a time.

    Attributes:
        model_id: identifies the model in ``image_hash``.
        image_marker: the text the chat template writes for one image (``"<image>"``).
        image_token_id: the id of the tokens that take image embeddings.
    """

    def __init__(self, hf_processor: Any, model_id: str) -> None:
        self._hf = hf_processor
        self.model_id = model_id
        self.image_marker: str = hf_processor.image_token
        self.image_token_id: int = int(hf_processor.image_token_id)
        marker_ids = hf_processor.tokenizer.encode(self.image_marker, add_special_tokens=False)
        assert marker_ids == [self.image_token_id], (
            f"image marker {self.image_marker!r} tokenizes to {marker_ids}, "
            f"not [{self.image_token_id}]")
        self._settings = self.settings_bytes()

    @classmethod
    def from_pretrained(cls, path: str, model_id: str | None = None) -> MultimodalProcessor:
        """Load ``AutoProcessor`` from a checkpoint directory (never downloads).

        ``model_id`` defaults to config.json's ``_name_or_path``, else the directory name.
        """
        from transformers import AutoProcessor

        if model_id is None:
            cfg_path = os.path.join(path, "config.json")
            cfg = json.loads(open(cfg_path).read()) if os.path.isfile(cfg_path) else {}
            model_id = cfg.get("_name_or_path") or os.path.basename(os.path.realpath(path))
        hf = AutoProcessor.from_pretrained(path, local_files_only=True)
        return cls(hf, model_id)

    @property
    def hf(self) -> Any:
        """The wrapped transformers processor."""
        return self._hf

    def settings_bytes(self) -> bytes:
        """Canonical JSON of the image processor's settings plus the processor attributes
        that shape the expansion (sorted keys, no whitespace)."""
        settings = dict(self._hf.image_processor.to_dict())
        for attr in _EXPANSION_ATTRS:
            if getattr(self._hf, attr, None) is not None:
                settings[f"processor.{attr}"] = getattr(self._hf, attr)
        return json.dumps(settings, sort_keys=True, separators=(",", ":"),
                          default=str).encode("utf-8")

    def image_hash(self, data: bytes) -> bytes:
        """32-byte blake2b of (version tag, model id, processor settings, image bytes), each
        length-prefixed so no two field splits collide."""
        h = hashlib.blake2b(digest_size=32)
        for field in (IMAGE_HASH_VERSION, self.model_id.encode("utf-8"), self._settings, data):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
        return h.digest()

    def process_image(self, data: bytes) -> ImageSegment:
        """Decode, preprocess and expand one image.

        Raises:
            ValueError: the bytes are not a decodable image.
        """
        image = decode_image(data)
        out = self._hf(text=self.image_marker, images=image, add_special_tokens=False,
                       return_tensors="pt")
        token_ids = tuple(int(t) for t in out["input_ids"][0])
        pixel_values = out["pixel_values"].to(torch.float32)
        if pixel_values.dim() == 5:  # Idefics3: [batch=1, num_tiles, 3, H, W]
            pixel_values = pixel_values[0]
        mask = out.get("pixel_attention_mask")
        assert mask is None or bool(mask.all()), "one image's tiles should have no padding"
        return ImageSegment(token_ids=token_ids, pixel_values=pixel_values.contiguous(),
                            num_embeddings=token_ids.count(self.image_token_id),
                            image_hash=self.image_hash(data), width=image.width,
                            height=image.height)

    def expand_prompt(self, prompt_token_ids: Sequence[int],
                      segments: Sequence[ImageSegment]) -> tuple[list[int], list[int]]:
        """Replace the ``i``-th ``image_token_id`` of a prompt tokenized with one marker per
        image by ``segments[i].token_ids``.

        Returns:
            (expanded token ids, offset of each segment in them).
        Raises:
            ValueError: the prompt's marker count differs from ``len(segments)``.
        """
        return splice_segments(prompt_token_ids, self.image_token_id,
                               [s.token_ids for s in segments])
