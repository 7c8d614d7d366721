"""Vision encoders of the served VLM families: the shared ViT pieces and the base class.

One ``VisionEncoder.encode`` call turns ONE image's preprocessed pixels into the rows that
replace its ``image_token_id`` positions, in the order HF's merger (``masked_scatter`` over
the image-token mask) puts them into the prompt. The families (plain torch, no transformers
modules at run time):

    engine/vision_llava.py     CLIP ViT + MLP projector (``LlavaForConditionalGeneration``)
    engine/vision_idefics3.py  SigLIP-style ViT + pixel-shuffle connector (Idefics3 / SmolVLM)
    engine/vision_loader.py    ``load_vision(path, dtype)``: encoder + processor of a checkpoint

Weights load through ``load_hf_state_dict`` from the *vision-relative* names that
``engine.loader.split_vlm_state`` produces; module names mirror HF's, so loading is strict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str):
    """The elementwise function HF's ``ACT2FN[name]`` computes.

    Raises:
        ValueError: an activation these encoders do not implement.
    """
    fns = {
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name not in fns:
        raise ValueError(f"unsupported activation {name!r} (one of {sorted(fns)})")
    return fns[name]


@dataclass(frozen=True)
class ViTConfig:
    """The transformer part shared by the CLIP and SigLIP-style towers."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # pixels per side of one (tile) input
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not a multiple of {self.patch_size}")
        activation(self.hidden_act)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, vision: dict) -> ViTConfig:
        """From an HF ``vision_config`` dict (CLIP / Idefics3 vision)."""
        return cls(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                   num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                   image_size=vision["image_size"], patch_size=vision["patch_size"],
                   layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
                   hidden_act=vision.get("hidden_act", "quick_gelu"))


class _Attention(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(d, d, dtype=dtype) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape  # x: [B, S, D]
        q, k, v = (p(x).view(b, s, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, S, Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class _MLP(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm ViT block (HF ``CLIPEncoderLayer`` / ``Idefics3EncoderLayer``)."""

    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = _Attention(cfg, dtype)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = _MLP(cfg, dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[B, S, D]``; mask: ``[B, 1, 1, S]`` bool (True = attend) or None."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, dtype) for _ in range(cfg.num_layers))


class VisionEncoder(nn.Module):
    """Base of the per-family encoders: one image's pixels -> its embedding rows.

    Attributes:
        text_hidden_size: width of the output rows (the text decoder's hidden size).
        dtype: parameter and output dtype.
    """

    def __init__(self, text_hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.text_hidden_size = text_hidden_size
        self.dtype = dtype

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[num_embeddings, text_hidden_size]``, ``self.dtype``, on the module's device."""
        raise NotImplementedError

    def encode_batch(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """``encode`` of several images; families override it to run one forward pass."""
        return [self.encode(p) for p in pixel_values]

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy vision-relative HF-named weights in (``engine.loader.split_vlm_state``).

        Raises:
            KeyError: a weight is missing or unexpected.
        """
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"{type(self).__name__}: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
        with torch.no_grad():
            for name, t in own.items():
                src = state[name]
                if src.shape != t.shape:
                    raise KeyError(f"{name}: checkpoint shape {tuple(src.shape)}, "
                                   f"model {tuple(t.shape)}")
                t.copy_(src.to(t.dtype))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
