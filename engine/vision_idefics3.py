"""Idefics3 / SmolVLM's image path: SigLIP-style ViT + pixel-shuffle connector.

    pixel_values [num_tiles, 3, S, S] -> drop all-zero padding tiles -> ViT with bucketed
    (NaViT-style) position ids and ``post_layernorm`` -> pixel shuffle by ``scale_factor``
    -> bias-free ``modality_projection`` -> [num_tiles * (S / patch / scale)^2, text_hidden]

Matches HF ``Idefics3Model.get_image_features``. Rows: tile by tile in the processor's order
(split tiles row by row, then the global image), within a tile the shuffled grid row-major.
Weight names (vision-relative): ``vision_model.{embeddings,encoder.layers.N,post_layernorm}.*``,
``connector.modality_projection.proj.weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scission.engine.vision import Encoder, VisionEncoder, ViTConfig


@dataclass(frozen=True)
class Idefics3VisionConfig:
    vit: ViTConfig
    text_hidden_size: int
    scale_factor: int

    def __post_init__(self) -> None:
        if self.vit.patches_per_side % self.scale_factor:
            raise ValueError(f"{self.vit.patches_per_side} patches a side not divisible by "
                             f"scale_factor {self.scale_factor}")

    @property
    def tokens_per_tile(self) -> int:
        return (self.vit.patches_per_side // self.scale_factor) ** 2

    @classmethod
    def from_hf(cls, hf: dict) -> Idefics3VisionConfig:
        """From an ``Idefics3ForConditionalGeneration`` config.json dict."""
        vision = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                  **hf["vision_config"]}
        return cls(vit=ViTConfig.from_hf(vision), text_hidden_size=hf["text_config"]["hidden_size"],
                   scale_factor=int(hf.get("scale_factor", 2)))


class Idefics3Embeddings(nn.Module):
    """Patch embedding plus NaViT-style bucketed position ids (HF ``Idefics3VisionEmbeddings``).

    A tile whose valid region is ``h x w`` patches (``patch_attention_mask``) spreads its rows
    over the ``N x N`` position grid: patch row ``r`` takes bucket ``bucketize(r / h)`` of the
    boundaries ``1/N, 2/N, ...``; padding patches take position 0 (masked out downstream).
    """

    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.patches_per_side = cfg.patches_per_side
        self.patch_embedding = nn.Conv2d(3, d, p, stride=p, dtype=dtype)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, d, dtype=dtype)

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """patch_mask: ``[B, Ph, Pw]`` bool -> ``[B, Ph * Pw]`` int64."""
        n = self.patches_per_side
        b, ph, pw = patch_mask.shape
        boundaries = torch.arange(1 / n, 1.0, 1 / n, device=patch_mask.device)
        nb_h = patch_mask[:, :, 0].sum(dim=1)  # [B] valid patch rows
        nb_w = patch_mask[:, 0, :].sum(dim=1)  # [B] valid patch columns
        rows = torch.arange(ph, device=patch_mask.device, dtype=torch.float32)
        cols = torch.arange(pw, device=patch_mask.device, dtype=torch.float32)
        frac_h = torch.clamp(rows[None, :] * (1.0 / nb_h)[:, None], max=1.0 - 1e-6)  # [B, Ph]
        frac_w = torch.clamp(cols[None, :] * (1.0 / nb_w)[:, None], max=1.0 - 1e-6)  # [B, Pw]
        bucket_h = torch.bucketize(frac_h, boundaries, right=True)
        bucket_w = torch.bucketize(frac_w, boundaries, right=True)
        pos = (bucket_h[:, :, None] * n + bucket_w[:, None, :]).reshape(b, -1)
        return torch.where(patch_mask.reshape(b, -1), pos, torch.zeros_like(pos))

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, P, D]
        return patches + self.position_embedding(self.position_ids(patch_mask))


class Idefics3VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embeddings = Idefics3Embeddings(cfg, dtype)
        self.encoder = Encoder(cfg, dtype)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values ``[B, 3, S, S]``, patch_mask ``[B, Ph, Pw]`` bool -> ``[B, P, D]``."""
        h = self.embeddings(pixel_values, patch_mask)
        flat = patch_mask.reshape(patch_mask.shape[0], -1)
        # Keys of padding patches are masked; queries are not (HF's bidirectional mask).
        mask = None if bool(flat.all()) else flat[:, None, None, :]  # [B, 1, 1, P]
        for layer in self.encoder.layers:
            h = layer(h, mask)
        return self.post_layernorm(h)


def pixel_shuffle(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """HF ``Idefics3Connector.pixel_shuffle``: ``[B, P, D] -> [B, P / s^2, D * s^2]``, each
    output row the ``s x s`` block of neighbouring patches (P a square)."""
    b, seq, d = x.shape
    side = math.isqrt(seq)
    assert side * side == seq, f"pixel shuffle needs a square patch grid, got {seq} patches"
    s = scale_factor
    x = x.view(b, side, side // s, d * s)  # fold s neighbouring columns
    x = x.permute(0, 2, 1, 3).reshape(b, side // s, side // s, d * s * s)  # fold s rows
    return x.permute(0, 2, 1, 3).reshape(b, seq // (s * s), d * s * s)


class Idefics3Connector(nn.Module):
    def __init__(self, cfg: Idefics3VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.scale_factor = cfg.scale_factor
        d_in = cfg.vit.hidden_size * cfg.scale_factor**2
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(d_in, cfg.text_hidden_size, bias=False,
                                                  dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(pixel_shuffle(x, self.scale_factor))


class Idefics3VisionEncoder(VisionEncoder):
    """SigLIP-style ViT + pixel-shuffle connector (HF ``Idefics3Model.get_image_features``)."""

    def __init__(self, cfg: Idefics3VisionConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg.text_hidden_size, dtype)
        self.cfg = cfg
        self.vision_model = Idefics3VisionTransformer(cfg.vit, dtype)
        self.connector = Idefics3Connector(cfg, dtype)
        self.requires_grad_(False)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor,
               pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One image's tiles -> ``[num_real_tiles * tokens_per_tile, text_hidden_size]``.

        Args:
            pixel_values: ``[num_tiles, 3, S, S]`` (``S = image_size``), the processor's
                tiles of one image; all-zero tiles (batch padding) are dropped, as HF does.
            pixel_attention_mask: ``[num_tiles, S, S]`` (1 = real pixel) or None (all real).
                A patch is real if any of its pixels is; padding patches are masked as keys.
        Raises:
            ValueError: wrong shape, or no real tile.
        """
        x, patch_mask = self._real_tiles(pixel_values, pixel_attention_mask)
        return self._features(x, patch_mask).reshape(-1, self.text_hidden_size)

    @torch.inference_mode()
    def encode_batch(self, pixel_values: list[torch.Tensor],
                     pixel_attention_masks: list[torch.Tensor | None] | None = None
                     ) -> list[torch.Tensor]:
        """Several images in one forward pass: ``encode`` of each, in order.

        The real tiles of every image are concatenated along the tile dim (``[sum T_i, 3, S,
        S]``), run once, and split back per image.

        Args:
            pixel_values: image ``i``'s tiles ``[T_i, 3, S, S]``.
            pixel_attention_masks: ``[T_i, S, S]`` or None per image (None: all real).
        Returns:
            ``[num_real_tiles_i * tokens_per_tile, text_hidden_size]`` per image.
        Raises:
            ValueError: a wrong shape, an image with no real tile, or a mask list of
                another length.
        """
        masks = pixel_attention_masks or [None] * len(pixel_values)
        if len(masks) != len(pixel_values):
            raise ValueError(f"{len(masks)} masks for {len(pixel_values)} images")
        if not pixel_values:
            return []
        tiles = [self._real_tiles(p, m) for p, m in zip(pixel_values, masks, strict=True)]
        x = torch.cat([t[0] for t in tiles])  # [sum T_i, 3, S, S]
        patch_mask = torch.cat([t[1] for t in tiles])  # [sum T_i, Ph, Pw]
        feats = self._features(x, patch_mask)  # [sum T_i, tokens_per_tile, Dt]
        rows = feats.split([t[0].shape[0] for t in tiles])
        return [r.reshape(-1, self.text_hidden_size) for r in rows]

    def _real_tiles(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's non-padding tiles ``[T, 3, S, S]`` (device, dtype) and their patch
        mask ``[T, S / patch, S / patch]`` bool."""
        s = self.cfg.vit.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"Idefics3 expects pixel_values [num_tiles, 3, {s}, {s}], "
                             f"got {list(pixel_values.shape)}")
        x = pixel_values.to(self.device, self.dtype)
        real = (x != 0).flatten(1).any(dim=1)  # [num_tiles] not a padding tile
        if not bool(real.any()):
            raise ValueError("every tile is padding (all zeros)")
        if pixel_attention_mask is None:
            pixel_attention_mask = torch.ones(x.shape[0], s, s, dtype=torch.bool)
        if tuple(pixel_attention_mask.shape) != (x.shape[0], s, s):
            raise ValueError(f"pixel_attention_mask {list(pixel_attention_mask.shape)} does "
                             f"not match pixel_values {list(x.shape)}")
        x, pixel_mask = x[real], pixel_attention_mask.to(x.device)[real]
        p = self.cfg.vit.patch_size
        return x, pixel_mask.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0

    def _features(self, x: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """``[T, 3, S, S]`` tiles -> ``[T, tokens_per_tile, text_hidden]``."""
        return self.connector(self.vision_model(x, patch_mask))
