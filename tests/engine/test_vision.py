"""Vision-language checkpoints against HF transformers, on tiny random LLaVA and Idefics3
models (tests/engine/mm_fixtures.py): the processor's segments and pixels, the vision
encoders' embeddings, the text decoder's logits (text-only and with images), image hashes,
and undecodable images."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from scission.engine.attention import AttentionMetadata, TorchAttentionBackend
from scission.engine.kv_cache import KVCache
from scission.engine.loader import load_checkpoint, split_vlm_state
from scission.engine.mm_processor import MultimodalProcessor, decode_image
from scission.engine.model import LlamaForCausalLM
from scission.engine.vision import VisionEncoder
from scission.engine.vision_loader import load_vision

# (width, height, format): landscape, portrait, square, tiny odd-sized, RGBA, grayscale.
IMAGES = [(100, 60, "PNG"), (30, 90, "JPEG"), (64, 64, "PNG"), (17, 23, "JPEG"),
          (45, 70, "RGBA"), (80, 33, "L")]
ATOL = RTOL = 1e-5  # float32 embeddings, same math as HF in another op order
LOGITS_ATOL = LOGITS_RTOL = 1e-4  # as tests/engine/test_tiny_models.py


def image_bytes(width: int, height: int, fmt: str, seed: int) -> bytes:
    """A seeded gradient-plus-noise image encoded as PNG (RGB/RGBA/L) or JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                     (xx + yy) * 127 / (width + height)], axis=-1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))
    if fmt in ("RGBA", "L"):
        image = image.convert(fmt)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if fmt == "JPEG" else "PNG")
    return buf.getvalue()


ALL_BYTES = [image_bytes(w, h, f, seed) for seed, (w, h, f) in enumerate(IMAGES)]


@dataclass
class VLM:
    family: str
    path: str
    encoder: VisionEncoder
    processor: MultimodalProcessor
    hf: object  # transformers *ForConditionalGeneration, float32, eval


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def vlm(request) -> VLM:
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(2)
    path = request.getfixturevalue(f"tiny_{request.param}_dir")
    loaded = load_vision(path)
    assert loaded is not None
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return VLM(request.param, path, *loaded, hf)


def hf_inputs(processor: MultimodalProcessor, text: str, images: list[bytes]):
    return processor.hf(text=text, images=[decode_image(b) for b in images],
                        return_tensors="pt")


def hf_image_features(vlm: VLM, inputs) -> torch.Tensor:
    """HF's ``get_image_features`` rows for every image of ``inputs``, concatenated."""
    kwargs = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask") if k in inputs}
    with torch.no_grad():
        return torch.cat(list(vlm.hf.get_image_features(**kwargs).pooler_output), dim=0)


def prompts(processor: MultimodalProcessor) -> list[tuple[str, list[bytes]]]:
    """Chat-templated and raw prompts with images against text on both sides, newlines
    included, no spaces at the boundaries."""
    m = processor.image_marker
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                         {"type": "image"}, {"type": "text", "text": "these."}]}]
    rendered = processor.hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return [(rendered, ALL_BYTES[:2]),
            (f"look:{m}then\n\n{m}\n{m}end", ALL_BYTES[2:5]),
            (f"{m}", ALL_BYTES[5:6]),
            (f"one {m} two {m}", [ALL_BYTES[0], ALL_BYTES[0]])]


def spliced(processor: MultimodalProcessor, text: str, images: list[bytes]) -> list[int]:
    segments = [processor.process_image(b) for b in images]
    ids, offsets = processor.expand_prompt(processor.hf.tokenizer(text)["input_ids"], segments)
    for seg, off in zip(segments, offsets, strict=True):
        assert tuple(ids[off : off + len(seg.token_ids)]) == seg.token_ids
    return ids


def test_segments_spliced_equal_hf_input_ids(vlm):
    """Each image's segment, spliced into the prompt tokenized with one marker per image,
    gives exactly HF's processor(text, images) input_ids; the per-image pixel values, in
    order, are exactly HF's."""
    for text, images in prompts(vlm.processor):
        ref = hf_inputs(vlm.processor, text, images)
        assert spliced(vlm.processor, text, images) == ref["input_ids"][0].tolist(), text
        ours = torch.cat([vlm.processor.process_image(b).pixel_values for b in images])
        theirs = ref["pixel_values"] if vlm.family == "llava" else ref["pixel_values"][0]
        assert ours.dtype == torch.float32
        assert torch.equal(ours, theirs)


def test_segment_shapes(vlm):
    """LLaVA: 25 ``<image>`` tokens and one 30 px image; Idefics3: 16 tokens per tile, a
    100x60 image in 2x2 tiles + the global image, wrapped as the processor does."""
    seg = vlm.processor.process_image(ALL_BYTES[0])
    assert (seg.width, seg.height) == (100, 60)
    assert len(seg.image_hash) == 32
    if vlm.family == "llava":
        assert seg.token_ids == (vlm.processor.image_token_id,) * 25
        assert seg.pixel_values.shape == (1, 3, 30, 30)
        return
    tok = vlm.processor.hf.tokenizer
    assert seg.num_embeddings == 5 * 16
    assert seg.pixel_values.shape == (5, 3, 32, 32)
    names = tok.convert_ids_to_tokens(list(seg.token_ids))
    assert names[:2] == ["<fake_token_around_image>", "<row_1_col_1>"]
    assert names[-19:-17] == ["<fake_token_around_image>", "<global-img>"]
    assert names[-1] == "<fake_token_around_image>"
    assert names.count("<fake_token_around_image>") == 6


def test_encode_equals_hf_image_features(vlm):
    """``encode`` of each image's pixel values gives HF's ``get_image_features`` rows
    (float32, atol=rtol=1e-5), one row per ``image_token_id`` of its segment."""
    for data in ALL_BYTES:
        seg = vlm.processor.process_image(data)
        ours = vlm.encoder.encode(seg.pixel_values)
        assert ours.shape == (seg.num_embeddings, vlm.hf.config.text_config.hidden_size)
        ref = hf_image_features(vlm, hf_inputs(vlm.processor, vlm.processor.image_marker, [data]))
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_idefics3_unsplit_processor_matches_hf(tiny_idefics3_dir):
    """With image splitting off, an image is one tile wrapped as ``<fake><global-img>
    <image>*16<fake>``; ids, pixels and embeddings still equal HF's."""
    proc = MultimodalProcessor.from_pretrained(tiny_idefics3_dir)
    proc.hf.image_processor.do_image_splitting = False
    proc = MultimodalProcessor(proc.hf, proc.model_id)
    vlm = VLM("idefics3", tiny_idefics3_dir, load_vision(tiny_idefics3_dir)[0], proc, None)
    text = f"a{proc.image_marker}b"
    ref = hf_inputs(proc, text, ALL_BYTES[:1])
    assert spliced(proc, text, ALL_BYTES[:1]) == ref["input_ids"][0].tolist()
    seg = proc.process_image(ALL_BYTES[0])
    assert seg.pixel_values.shape == (1, 3, 32, 32) and seg.num_embeddings == 16
    assert torch.equal(seg.pixel_values, ref["pixel_values"][0])
    assert vlm.encoder.encode(seg.pixel_values).shape == (16, 64)


def test_idefics3_padded_tiles_match_hf(vlm):
    """A tile with a padded (masked) region and an all-zero padding tile: ``encode`` with
    the pixel mask drops the zero tile, buckets the partial tile's position ids and masks its
    padding keys exactly as HF does (atol=rtol=1e-5)."""
    if vlm.family != "idefics3":
        pytest.skip("pixel_attention_mask is Idefics3's")
    tiles = vlm.processor.process_image(ALL_BYTES[0]).pixel_values[:3].clone()
    mask = torch.ones(tiles.shape[0], 32, 32, dtype=torch.long)
    mask[1, 20:, :], mask[1, :, 27:] = 0, 0  # 20 x 27 valid pixels: 5 x 7 patches of 4
    tiles[1] *= mask[1]
    tiles[2] = 0  # a padding tile
    ours = vlm.encoder.encode(tiles, mask)
    with torch.no_grad():
        ref = vlm.hf.get_image_features(pixel_values=tiles[None],
                                        pixel_attention_mask=mask[None]).pooler_output[0]
    assert ours.shape == (2 * 16, 64)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def our_logits(path: str, ids: list[int], mm_rows: torch.Tensor | None = None,
               mm_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill logits ``[len(ids), vocab]`` of our LlamaForCausalLM loaded from ``path``."""
    cfg, state = load_checkpoint(path)
    model = LlamaForCausalLM(cfg)
    model.load_hf_state_dict(state)
    n, block_size = len(ids), 16
    num_blocks = -(-n // block_size)
    kv = KVCache(cfg, num_blocks, block_size, torch.float32)
    md = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_table=torch.arange(num_blocks, dtype=torch.int32)[None],
        slot_mapping=torch.arange(n, dtype=torch.int64), max_seqlen_q=n, max_seq_len=n,
        block_size=block_size, query_lens=(n,), seq_lens_host=(n,))
    attn = TorchAttentionBackend()
    attn.plan(md)
    hidden = model(torch.tensor(ids), torch.arange(n), kv.layers, attn, mm_rows, mm_embeds)
    return model.compute_logits(hidden)


def test_text_logits_equal_hf_language_model(vlm):
    """The loaded text decoder (renamed weights, untied lm_head) gives the HF VLM's logits
    on a text-only prompt, every position (atol=rtol=1e-4)."""
    ids = vlm.processor.hf.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    with torch.no_grad():
        ref = vlm.hf(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(vlm.path, ids), ref, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def test_image_prompt_logits_equal_hf(vlm):
    """Spliced segments + ``encode`` rows at the ``image_token_id`` positions give the HF
    VLM's logits for processor(text, images) (atol=rtol=1e-4): the whole image path."""
    text, images = prompts(vlm.processor)[0]
    ids = spliced(vlm.processor, text, images)
    embeds = torch.cat([vlm.encoder.encode(vlm.processor.process_image(b).pixel_values)
                        for b in images])
    rows = torch.tensor([i for i, t in enumerate(ids) if t == vlm.processor.image_token_id])
    ref_inputs = hf_inputs(vlm.processor, text, images)
    with torch.no_grad():
        ref = vlm.hf(**ref_inputs).logits[0]
    torch.testing.assert_close(our_logits(vlm.path, ids, rows, embeds), ref,
                               atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def test_image_hash_stable_and_content_keyed(vlm):
    """The hash is the same across calls and processor instances; it changes with the image
    bytes (one pixel, or the same pixels re-encoded), the processor settings and the
    model id."""
    proc = vlm.processor
    data = ALL_BYTES[0]
    h = proc.process_image(data).image_hash
    assert h == proc.process_image(data).image_hash == proc.image_hash(data)
    assert MultimodalProcessor.from_pretrained(vlm.path).image_hash(data) == h
    arr = np.array(decode_image(data))
    arr[0, 0, 0] ^= 1
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert proc.image_hash(buf.getvalue()) != h
    Image.open(io.BytesIO(data)).save(buf := io.BytesIO(), format="PNG", compress_level=1)
    assert buf.getvalue() != data and proc.image_hash(buf.getvalue()) != h
    hf = copy.deepcopy(proc.hf)
    hf.image_processor.image_mean = [0.25, 0.25, 0.25]
    assert MultimodalProcessor(hf, proc.model_id).image_hash(data) != h
    assert MultimodalProcessor(proc.hf, proc.model_id + "-other").image_hash(data) != h


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated_png", "truncated_jpeg"])
def test_undecodable_image_raises_value_error(vlm, kind):
    """Bytes Pillow cannot decode (not an image, empty, cut short) raise ValueError."""
    data = {"garbage": b"definitely not an image" * 10, "empty": b"",
            "truncated_png": ALL_BYTES[0][: len(ALL_BYTES[0]) // 2],
            "truncated_jpeg": ALL_BYTES[1][: len(ALL_BYTES[1]) // 2]}[kind]
    with pytest.raises(ValueError, match="cannot decode image"):
        vlm.processor.process_image(data)


def test_split_vlm_state_accepts_both_layouts():
    """transformers 5.x names and the legacy (4.x) names map to the same text (HF Llama) and
    vision-relative names."""
    t = torch.zeros(1)
    new = {"model.language_model.layers.0.mlp.up_proj.weight": t, "lm_head.weight": t,
           "model.vision_tower.encoder.layers.0.mlp.fc1.weight": t,
           "model.multi_modal_projector.linear_1.weight": t}
    legacy = {"language_model.model.layers.0.mlp.up_proj.weight": t,
              "language_model.lm_head.weight": t,
              "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": t,
              "multi_modal_projector.linear_1.weight": t}
    idefics3 = {"model.text_model.layers.0.mlp.up_proj.weight": t, "lm_head.weight": t,
                "model.vision_model.post_layernorm.weight": t,
                "model.connector.modality_projection.proj.weight": t}
    text, vision = split_vlm_state(new)
    assert sorted(text) == ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    assert sorted(vision) == ["multi_modal_projector.linear_1.weight",
                              "vision_tower.encoder.layers.0.mlp.fc1.weight"]
    assert split_vlm_state(legacy) == (text, vision)
    text3, vision3 = split_vlm_state(idefics3)
    assert sorted(text3) == sorted(text)
    assert sorted(vision3) == ["connector.modality_projection.proj.weight",
                               "vision_model.post_layernorm.weight"]
    with pytest.raises(ValueError, match="unexpected tensor"):
        split_vlm_state({"something.else": t})


def test_load_vision_none_for_text_only(default_model_path):
    """The default (text-only, GGUF) model has no vision part."""
    assert load_vision(default_model_path) is None


@pytest.mark.parametrize("layers,strategy", [([-1, 0], "full"), (-1, "default"), (1, "full")])
def test_llava_feature_layers_and_strategy_match_hf(tiny_llava_dir, layers, strategy):
    """Other ``vision_feature_layer`` (a list concatenates layers; 0 is the embeddings) and
    ``vision_feature_select_strategy`` settings give HF's features (atol=rtol=1e-5); the
    weights come from an in-memory model's state dict (transformers 5.x names)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from scission.engine.vision_loader import build_vision_encoder

    config = AutoConfig.from_pretrained(tiny_llava_dir)
    config.vision_feature_layer, config.vision_feature_select_strategy = layers, strategy
    torch.manual_seed(1)
    hf = LlavaForConditionalGeneration(config).eval()
    encoder = build_vision_encoder(config.to_dict())
    encoder.load_hf_state_dict(split_vlm_state(hf.state_dict())[1])
    pixel_values = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixel_values).pooler_output[0]
    ours = encoder.encode(pixel_values)
    assert ours.shape == (25 + (strategy == "full"), 64)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_bfloat16_encoder_close_to_float32(vlm):
    """A bfloat16 encoder returns bfloat16 rows within bf16 rounding of the float32 ones."""
    enc16, _ = load_vision(vlm.path, torch.bfloat16)
    pixel_values = vlm.processor.process_image(ALL_BYTES[0]).pixel_values
    ref, ours = vlm.encoder.encode(pixel_values), enc16.encode(pixel_values)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_encode_batch_equals_per_image_encode(vlm):
    """``encode_batch`` runs several images (different tile counts for Idefics3, a repeated
    image) in one forward pass and returns, per image in order, ``encode``'s rows (float32,
    atol=rtol=1e-6: the same math on a larger batch)."""
    pixel_values = [vlm.processor.process_image(b).pixel_values for b in ALL_BYTES]
    pixel_values.append(pixel_values[0])
    batch = vlm.encoder.encode_batch(pixel_values)
    assert len(batch) == len(pixel_values)
    for ours, pv in zip(batch, pixel_values, strict=True):
        torch.testing.assert_close(ours, vlm.encoder.encode(pv), atol=1e-6, rtol=1e-6)
    assert vlm.encoder.encode_batch([]) == []
    if vlm.family == "idefics3":  # a masked partial tile and a padding tile next to a full image
        tiles = pixel_values[0][:3].clone()
        mask = torch.ones(3, 32, 32, dtype=torch.long)
        mask[1, 20:, :], tiles[2] = 0, 0
        tiles[1] *= mask[1]
        mixed = vlm.encoder.encode_batch([pixel_values[1], tiles], [None, mask])
        torch.testing.assert_close(mixed[1], vlm.encoder.encode(tiles, mask), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mixed[0], batch[1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="expects pixel_values"):
        vlm.encoder.encode_batch([pixel_values[0], pixel_values[0][0]])
