"""LLaVA's image path: CLIP ViT tower + linear-act-linear projector.

    pixel_values [1, 3, S, S] -> CLIP ViT (+CLS) -> hidden state(s) of ``vision_feature_layer``
    -> drop CLS ("default" strategy) -> projector -> [num_patches (+1 "full"), text_hidden_size]

Matches HF ``LlavaModel.get_image_features`` (single image, no ``image_sizes``). Weight names
(vision-relative): ``vision_tower.{embeddings,pre_layrnorm,encoder.layers.N,post_layernorm}.*``,
``multi_modal_projector.linear_{1,2}.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scission.engine.vision import Encoder, VisionEncoder, ViTConfig, activation


@dataclass(frozen=True)
class LlavaVisionConfig:
    """``vision_feature_layers``: hidden-state indices as HF counts them (0 = the embeddings
    after ``pre_layrnorm``, ``i`` = output of layer ``i``; negative from the end), concatenated
    along the feature dim. ``keep_cls``: strategy "full" (True) or "default" (False)."""

    vit: ViTConfig
    text_hidden_size: int
    vision_feature_layers: tuple[int, ...]
    keep_cls: bool
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self) -> None:
        n = self.vit.num_layers + 1
        if not self.vision_feature_layers or any(not -n <= i < n
                                                 for i in self.vision_feature_layers):
            raise ValueError(f"vision_feature_layer {self.vision_feature_layers} outside "
                             f"[-{n}, {n})")
        activation(self.projector_act)

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """``vision_feature_layers`` as non-negative hidden-state indices."""
        n = self.vit.num_layers + 1
        return tuple(i % n for i in self.vision_feature_layers)

    @classmethod
    def from_hf(cls, hf: dict) -> LlavaVisionConfig:
        """From a ``LlavaForConditionalGeneration`` config.json dict.

        Raises:
            ValueError: a vision tower other than CLIP, or an unknown select strategy.
        """
        vision = hf["vision_config"]
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"LLaVA vision tower {vision.get('model_type')!r} is not supported "
                             "(clip_vision_model)")
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {strategy!r}")
        layer = hf.get("vision_feature_layer", -2)
        return cls(vit=ViTConfig.from_hf(vision), text_hidden_size=hf["text_config"]["hidden_size"],
                   vision_feature_layers=(layer,) if isinstance(layer, int) else tuple(layer),
                   keep_cls=strategy == "full",
                   projector_act=hf.get("projector_hidden_act", "gelu"),
                   projector_bias=bool(hf.get("multimodal_projector_bias", True)))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(d, dtype=dtype))
        self.patch_embedding = nn.Conv2d(3, d, p, stride=p, bias=False, dtype=dtype)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2 + 1, d, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, P, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # [B, 1+P, D]


class ClipVisionTower(nn.Module):
    """HF ``CLIPVisionModel`` (``post_layernorm`` only feeds the pooled CLS output, which
    LLaVA never reads; it is kept so the checkpoint loads strictly)."""

    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg, dtype)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.encoder = Encoder(cfg, dtype)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Hidden states ``0 .. upto`` (HF numbering), each ``[B, 1 + num_patches, D]``;
        the layers past ``upto`` are not run."""
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [h]
        for layer in self.encoder.layers[:upto]:
            h = layer(h)
            states.append(h)
        return states


class LlavaProjector(nn.Module):
    def __init__(self, cfg: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d_in = cfg.vit.hidden_size * len(cfg.vision_feature_layers)
        d = cfg.text_hidden_size
        self.linear_1 = nn.Linear(d_in, d, bias=cfg.projector_bias, dtype=dtype)
        self.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias, dtype=dtype)
        self.act = activation(cfg.projector_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVisionEncoder(VisionEncoder):
    """CLIP ViT tower + LLaVA MLP projector (HF ``LlavaModel.get_image_features``)."""

    def __init__(self, cfg: LlavaVisionConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg.text_hidden_size, dtype)
        self.cfg = cfg
        self.vision_tower = ClipVisionTower(cfg.vit, dtype)
        self.multi_modal_projector = LlavaProjector(cfg, dtype)
        self.requires_grad_(False)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One image -> ``[num_patches + keep_cls, text_hidden_size]``, ``self.dtype``.

        Args:
            pixel_values: ``[1, 3, image_size, image_size]`` (the processor's output).
        Raises:
            ValueError: not one image of the tower's size (positions are not interpolated).
        """
        self._check(pixel_values)
        return self._features(pixel_values.to(self.device, self.dtype))[0]

    @torch.inference_mode()
    def encode_batch(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several images in one forward pass: ``encode`` of each, in order.

        Args:
            pixel_values: each ``[1, 3, image_size, image_size]``; stacked to ``[N, 3, S, S]``.
        Returns:
            ``N`` tensors ``[num_patches + keep_cls, text_hidden_size]``, ``self.dtype``.
        Raises:
            ValueError: an entry that is not one image of the tower's size.
        """
        if not pixel_values:
            return []
        for p in pixel_values:
            self._check(p)
        x = torch.cat([p.to(self.device, self.dtype) for p in pixel_values])  # [N, 3, S, S]
        return list(self._features(x).unbind(0))

    def _check(self, pixel_values: torch.Tensor) -> None:
        s = self.cfg.vit.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape) != (1, 3, s, s):
            raise ValueError(f"LLaVA expects pixel_values [1, 3, {s}, {s}], "
                             f"got {list(pixel_values.shape)}")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, 3, S, S]`` -> ``[B, P (+1), text_hidden]`` (HF ``get_image_features``)."""
        indices = self.cfg.layer_indices
        states = self.vision_tower.hidden_states(x, upto=max(indices))
        feats = torch.cat([states[i] for i in indices], dim=-1)  # [B, 1+P, D * num_layers]
        if not self.cfg.keep_cls:
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)
