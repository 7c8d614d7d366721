"""Weight loading: GGUF files (dequantized with ``gguf``) and HF safetensors directories.

Both paths produce a ``ModelConfig`` and a state dict with HF Llama parameter names
(``model.layers.{i}.self_attn.q_proj.weight`` ...), so the model has one naming scheme.
A vision-language directory (LLaVA, Idefics3/SmolVLM) gives its text decoder's config and
weights here; its vision encoder comes from ``engine.vision_loader.load_vision``.
Nothing is downloaded: the path must exist on disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scission.engine.config import ModelConfig

logger = logging.getLogger(__name__)

# GGUF tensor name -> HF name ({i} = layer index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def load_checkpoint(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a ``.gguf`` file or an HF safetensors directory.

    Returns:
        (config, state dict of float32 CPU tensors with HF names).
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported architecture or file kind.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if os.path.isdir(path):
        return _load_safetensors_dir(Path(path))
    if path.endswith(".gguf"):
        return _load_gguf(path)
    raise ValueError(f"{path!r}: expected a .gguf file or an HF checkpoint directory")


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(reader, path: str) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (llama, qwen2)")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    names = {t.name for t in reader.tensors}
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(g("vocab_size", 0) or len(_gguf_field(reader, "tokenizer.ggml.tokens"))),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=hidden // heads,
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        model_id=str(_gguf_field(reader, "general.name", os.path.basename(path))),
    )


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        hf = _GGUF_TO_HF.get(key)
        return None if hf is None else hf.format(i=parts[1])
    return _GGUF_TO_HF.get(gguf_name)


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (GGUF rope layout -> HF neox layout)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _load_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    config = _gguf_config(reader, path)
    arch = _gguf_field(reader, "general.architecture")
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            logger.warning("ignoring unknown GGUF tensor %s", t.name)
            continue
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml order -> row-major
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        w = torch.from_numpy(np.array(arr.reshape(shape), dtype=np.float32, copy=True))
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_qk(w, config.num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_qk(w, config.num_kv_heads)
        state[name] = w
    logger.info("loaded GGUF %s: %d tensors, %d layers", path, len(state), config.num_layers)
    return config, state


# Vision-language checkpoints whose text decoder is a Llama-family model.
VLM_ARCHITECTURES = ("LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration")
_TEXT_MODEL_TYPES = ("llama", "qwen2", "mistral")


def vlm_architecture(hf_config: dict) -> str | None:
    """The VLM architecture of a config.json dict (one of ``VLM_ARCHITECTURES``), or None."""
    archs = hf_config.get("architectures") or []
    return next((a for a in archs if a in VLM_ARCHITECTURES), None)


def read_vlm_config(path: Path) -> tuple[dict, str]:
    """(config dict with every field filled with transformers' defaults, model id) of a VLM
    checkpoint directory. The model id is config.json's ``_name_or_path``, else the
    directory's name; it names the model in ``ModelConfig`` and in image hashes alike."""
    from transformers import AutoConfig

    raw = json.loads((path / "config.json").read_text())
    full = AutoConfig.from_pretrained(str(path), local_files_only=True).to_dict()
    return full, raw.get("_name_or_path") or path.resolve().name


def is_vlm_text_tensor(name: str) -> bool:
    """Whether a VLM checkpoint tensor belongs to the text decoder (LM head included)."""
    return name.removeprefix("model.").startswith(("language_model.", "text_model.", "lm_head."))


def split_vlm_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                              dict[str, torch.Tensor]]:
    """Split a LLaVA / Idefics3 checkpoint's tensors into (text, vision) state dicts.

    Text names become HF Llama names; vision names become vision-relative names
    (``engine.vision``). Both the transformers 5.x layout and the legacy one are accepted:

        text    model.language_model.X | language_model.model.X | model.text_model.X
                                                                        -> model.X
                lm_head.weight | language_model.lm_head.weight          -> lm_head.weight
        vision  [model.]vision_tower[.vision_model].X                  -> vision_tower.X
                [model.]multi_modal_projector.X                         -> multi_modal_projector.X
                model.vision_model.X                                    -> vision_model.X
                model.connector.X                                       -> connector.X

    Raises:
        ValueError: a tensor name fits none of these.
    """
    text: dict[str, torch.Tensor] = {}
    vision: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        n = name.removeprefix("model.")
        if n.startswith("lm_head."):
            text[n] = t
        elif is_vlm_text_tensor(name):
            rest = n.split(".", 1)[1]
            text[rest if rest.startswith(("model.", "lm_head.")) else "model." + rest] = t
        elif n.startswith("vision_tower."):
            vision["vision_tower." + n.removeprefix("vision_tower.").removeprefix("vision_model.")] = t
        elif n.startswith(("multi_modal_projector.", "vision_model.", "connector.")):
            vision[n] = t
        else:
            raise ValueError(f"unexpected tensor {name!r} in a vision-language checkpoint")
    return text, vision


def read_safetensors_dir(path: Path, keep: Callable[[str], bool] | None = None
                         ) -> dict[str, torch.Tensor]:
    """The tensors of ``path/*.safetensors`` whose name ``keep`` accepts (all if None),
    float32 on CPU; the others are never read.

    Raises:
        FileNotFoundError: no ``*.safetensors`` file.
    """
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if keep is None or keep(name):
                    state[name] = st.get_tensor(name).float()
    return state


def _load_safetensors_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    hf = json.loads(cfg_path.read_text())
    if vlm_architecture(hf) is not None:
        hf, model_id = read_vlm_config(path)
        text_cfg = hf["text_config"]
        if text_cfg.get("model_type", "llama") not in _TEXT_MODEL_TYPES:
            raise ValueError(f"{path}: unsupported text model_type {text_cfg.get('model_type')!r}")
        state, _vision = split_vlm_state(read_safetensors_dir(path))
        tie = hf.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings"))
        return _model_config(text_cfg, state, model_id, tie), state
    archs = hf.get("architectures") or []
    if hf.get("model_type") not in _TEXT_MODEL_TYPES and not any(
        a.startswith(("Llama", "Qwen2", "Mistral")) for a in archs
    ):
        raise ValueError(f"{path}: unsupported model_type {hf.get('model_type')!r}")
    state = read_safetensors_dir(path)
    model_id = hf.get("_name_or_path") or path.name
    return _model_config(hf, state, model_id, hf.get("tie_word_embeddings")), state


def _model_config(hf: dict, state: dict[str, torch.Tensor], model_id: str,
                  tie: bool | None) -> ModelConfig:
    """ModelConfig of a Llama-family (text) config dict. ``tie`` None: tied iff the
    checkpoint has no ``lm_head.weight``; a missing ``lm_head.weight`` always ties."""
    eos = hf.get("eos_token_id")
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}  # transformers 5.x keeps rope_theta here
    tie = "lm_head.weight" not in state or bool(tie)
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        logger.warning("%s: rope scaling %s is ignored (plain RoPE)", model_id,
                       hf.get("rope_scaling") or rope)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=tie,
        attention_bias=hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        model_id=model_id,
    )
