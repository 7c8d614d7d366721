"""Issue 9's acceptance test for the engine alone: image chats through our whole path give
exactly HF transformers' greedy tokens, on the tiny LLaVA and Idefics3 checkpoints.

Our path, per run::

    Tokenizer.apply_chat_template(parts, image_marker)   one marker id per image part
    MultimodalProcessor.process_image(bytes)             segment ids + pixels, per image
    vision_encoder.encode_batch(all pixels of the run)   one forward pass
    MultimodalProcessor.expand_prompt(ids, segments)     == HF processor input_ids
    make_mm_input(...) per segment -> LLMEngine.add_request(..., mm_inputs)
    greedy, float32, every request of the run in flight together

against ``hf.generate(**processor(text=processor.apply_chat_template(chat), images),
do_sample=False)`` on the HF model loaded from the same directory in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from mm_fixtures import sharpened_checkpoint
from test_vision import image_bytes

from scission.engine.block_hash import hash_prompt_blocks
from scission.engine.config import (
    AttentionBackendKind,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
)
from scission.engine.kv_events import KVEventKind
from scission.engine.llm_engine import LLMEngine
from scission.engine.mm_processor import decode_image
from scission.engine.multimodal import MMInput, block_extra_keys, make_mm_input
from scission.engine.request import SamplingParams

MAX_NEW_TOKENS = 6
BLOCK_SIZE = 16
I = {"type": "image"}  # noqa: E741 (reads as the image slot in CHATS)


def T(text: str) -> dict:  # noqa: N802
    return {"type": "text", "text": text}


def turn(role: str, *parts: dict) -> dict:
    return {"role": role, "content": list(parts)}


# 1..3 images a prompt; text before, between and after images; system prompts; 2-3 user turns.
CHATS = [
    [turn("user", I)],
    [turn("user", T("Describe"), I)],
    [turn("user", I, T("What is this?"))],
    [turn("user", T("Compare"), I, T(" with "), I, T(" now."))],
    [turn("user", I, I, I)],
    [turn("system", T("Be terse.")), turn("user", T("Hi!"), I)],
    [turn("user", T("first"), I), turn("assistant", T("A picture.")),
     turn("user", T("and"), I, T("?"))],
    [turn("user", I, T("x")), turn("assistant", T("ok")), turn("user", T("more")),
     turn("assistant", T("sure")), turn("user", I, T("last"), I)],
    [turn("user", T("  spaced\n\nlines "), I, T("🤔"))],
    [turn("user", T("a"), I, T("b"), I)],
    [turn("system", T("You see images.")), turn("user", I), turn("assistant", T("Yes.")),
     turn("user", T("Again:"), I)],
    [turn("user", T("Three:"), I, T(","), I, T(", and"), I, T("."))],
]
# (width, height, format): landscape, portrait, square, tiny, very wide/tall; PNG (RGB, RGBA,
# L) and JPEG. Image k of the run is SIZES[k % len(SIZES)] with seed k.
SIZES = [(100, 60, "PNG"), (30, 90, "JPEG"), (64, 64, "PNG"), (17, 23, "JPEG"),
         (45, 70, "RGBA"), (80, 33, "L"), (120, 40, "JPEG"), (50, 50, "JPEG"), (33, 128, "PNG")]


def num_images(chat: list[dict]) -> int:
    return sum(p["type"] == "image" for m in chat for p in m["content"])


def chat_images(first_seed: int, chat: list[dict]) -> list[bytes]:
    return [image_bytes(*SIZES[k % len(SIZES)], seed=k)
            for k in range(first_seed, first_seed + num_images(chat))]


def other(images: list[bytes]) -> list[bytes]:
    """Images of the same sizes and formats as ``chat_images``' (so the same prompt ids),
    other pixels."""
    return [image_bytes(*SIZES[k % len(SIZES)], seed=1000 + k) for k in range(len(images))]


ALL_CHATS: list[tuple[list[dict], list[bytes]]] = []
for _chat in CHATS:
    ALL_CHATS.append((_chat, chat_images(sum(num_images(c) for c, _ in ALL_CHATS), _chat)))


@dataclass
class Family:
    name: str
    path: str
    hf: object  # transformers *ForConditionalGeneration, float32, eval
    engine: LLMEngine  # budget 512: several prompts per step, prefills and decodes mixed
    hf_cache: dict = field(default_factory=dict)  # (rendered, images) -> (input ids, tokens)

    def hf_greedy(self, chat: list[dict], images: list[bytes]) -> tuple[list[int], list[int]]:
        """HF's processor input ids and greedy tokens for ``chat`` with ``images``."""
        proc = self.engine.mm_processor.hf
        rendered = proc.apply_chat_template(chat, add_generation_prompt=True)
        key = (rendered, tuple(images))
        if key not in self.hf_cache:
            inputs = proc(text=rendered, images=[decode_image(b) for b in images],
                          return_tensors="pt")
            with torch.no_grad():
                out = self.hf.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            ids = inputs["input_ids"][0].tolist()
            self.hf_cache[key] = (ids, out[0, len(ids) :].tolist())
        return self.hf_cache[key]


def make_engine(path: str, budget_tokens: int) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_path=path, attention_backend=AttentionBackendKind.TORCH, num_threads=2,
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=512),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget_tokens)))


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def family(request, tmp_path_factory) -> Family:
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(2)
    src = request.getfixturevalue(f"tiny_{request.param}_dir")
    path = sharpened_checkpoint(src, str(tmp_path_factory.mktemp(f"sharp_{request.param}")))
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return Family(request.param, path, hf, make_engine(path, 512))


def build_prompts(engine: LLMEngine, chats: list[tuple[list[dict], list[bytes]]]
                  ) -> list[tuple[list[int], list[MMInput]]]:
    """Prompt ids and mm_inputs of every chat; the run's images are encoded in ONE
    ``encode_batch`` call."""
    proc = engine.mm_processor
    segments = [[proc.process_image(b) for b in images] for _, images in chats]
    flat = [s for segs in segments for s in segs]
    embeds = iter(engine.vision_encoder.encode_batch([s.pixel_values for s in flat]))
    prompts = []
    for (chat, _), segs in zip(chats, segments, strict=True):
        ids = engine.tokenizer.apply_chat_template(chat, image_marker=proc.image_marker)
        prompt, offsets = proc.expand_prompt(ids, segs)
        mms = [make_mm_input(prompt, off, len(s.token_ids), proc.image_token_id, s.image_hash,
                             next(embeds)) for s, off in zip(segs, offsets, strict=True)]
        prompts.append((prompt, mms))
    return prompts


def run_together(engine: LLMEngine, prompts: list[tuple[list[int], list[MMInput]]],
                 tag: str) -> tuple[list[list[int]], list[int], int]:
    """Greedy tokens and ``num_cached_tokens`` of each prompt, all in flight together, and the
    largest number of requests one step scheduled."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, (prompt, mms) in zip(rids, prompts, strict=True):
        engine.add_request(rid, prompt, params, mm_inputs=mms)
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    cached: dict[str, int] = {}
    max_batch = 0
    while engine.has_unfinished():
        max_batch = max(max_batch, len(engine.scheduler.running))
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            cached[out.request_id] = out.num_cached_tokens
    return [tokens[r] for r in rids], [cached[r] for r in rids], max_batch


def test_greedy_tokens_equal_hf(family):
    """12 chats (24 over both families; 1..3 images each, PNG and JPEG of 9 sizes, text around
    the images, several turns), all in one engine run: prompt ids equal HF processor's
    input_ids, greedy tokens equal HF generate's, every one of them; and HF's tokens change
    with other images for at least half of the chats (the equality sees the images)."""
    prompts = build_prompts(family.engine, ALL_CHATS)
    tokens, _, max_batch = run_together(family.engine, prompts, "all")
    assert max_batch > 1, "the requests were never batched together"
    for (chat, images), (prompt, _), ours in zip(ALL_CHATS, prompts, tokens, strict=True):
        ref_ids, ref_tokens = family.hf_greedy(chat, images)
        assert prompt == ref_ids, chat
        assert ours == ref_tokens, chat
    # Not vacuous: other images of the same sizes (same prompt ids) change HF's tokens.
    changed = sum(family.hf_greedy(chat, images)[1] != family.hf_greedy(chat, other(images))[1]
                  for chat, images in ALL_CHATS)
    assert changed >= len(ALL_CHATS) // 2, changed


def test_chunked_prefill_splits_image_segments(family):
    """An 11-token step budget splits every image segment (25 LLaVA / 18+ Idefics3 tokens)
    over several prefill chunks, while 4 multi-image prompts run together: still HF's
    tokens."""
    chats = [ALL_CHATS[i] for i in (3, 4, 7, 11)]
    engine = make_engine(family.path, 11)
    prompts = build_prompts(engine, chats)
    assert all(mm.length > 11 for _, mms in prompts for mm in mms)
    tokens, _, max_batch = run_together(engine, prompts, "chunked")
    assert max_batch > 1
    for (chat, images), ours in zip(chats, tokens, strict=True):
        assert ours == family.hf_greedy(chat, images)[1], chat


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prefix_cache_hit_on_image_blocks(family):
    """A later request continuing an earlier chat (same first image) hits the cached blocks
    of the common prefix, image blocks included: ``num_cached_tokens`` is exactly the
    common prefix's full blocks, past the image's first token, and the tokens are still
    HF's."""
    engine = make_engine(family.path, 512)
    first_chat, first_images = ALL_CHATS[1]
    first = build_prompts(engine, [ALL_CHATS[1]])
    first_tokens, first_cached, _ = run_together(engine, first, "first")
    later_chat = first_chat + [turn("assistant", T("A gradient.")),
                               turn("user", T("And this one?"), I)]
    later_images = first_images + [image_bytes(70, 40, "JPEG", seed=99)]
    later = build_prompts(engine, [(later_chat, later_images)])
    tokens, cached, _ = run_together(engine, later, "later")
    first_all = first[0][0] + first_tokens[0]
    expected = common_prefix(first_all, later[0][0]) // BLOCK_SIZE * BLOCK_SIZE
    image = first[0][1][0]
    assert first_cached == [0]
    assert cached == [expected] and expected > image.offset
    assert tokens[0] == family.hf_greedy(later_chat, later_images)[1]


def stored_hashes(engine: LLMEngine) -> list[int]:
    return [h for e in engine.take_kv_events() if e.kind == KVEventKind.STORED
            for h in e.block_hashes]


def test_same_text_other_image_other_block_hashes(family):
    """Two prompts with the same token ids (same text, two images of the same size) share
    the KV block hashes of the blocks before the image and differ on every block from the
    first one the image overlaps: the second request hits only the text blocks, stores
    none of the first image's blocks, and gives HF's tokens for its own image."""
    engine = make_engine(family.path, 512)
    chat = [turn("system", T("A long system prompt so that the image starts past block 0.")),
            turn("user", T("Look at"), I, T("please"))]
    a = image_bytes(100, 60, "PNG", seed=7)
    b = image_bytes(100, 60, "PNG", seed=8)
    (ids_a, mms_a), (ids_b, mms_b) = build_prompts(engine, [(chat, [a]), (chat, [b])])
    assert ids_a == ids_b and mms_a[0].image_hash != mms_b[0].image_hash
    first_block = mms_a[0].offset // BLOCK_SIZE
    assert first_block > 0
    n = len(ids_a) // BLOCK_SIZE
    seed = engine.block_manager.hash_seed
    hashes_a, hashes_b = (hash_prompt_blocks(seed, ids_a, BLOCK_SIZE, (),
                                             block_extra_keys(mms, n, BLOCK_SIZE))
                          for mms in (mms_a, mms_b))
    assert [x == y for x, y in zip(hashes_a, hashes_b, strict=True)] == [
        i < first_block for i in range(n)]
    run_together(engine, [(ids_a, mms_a)], "a")
    assert stored_hashes(engine)[:n] == hashes_a
    tokens, cached, _ = run_together(engine, [(ids_b, mms_b)], "b")
    assert cached == [first_block * BLOCK_SIZE]
    assert stored_hashes(engine)[: n - first_block] == hashes_b[first_block:]
    assert tokens[0] == family.hf_greedy(chat, [b])[1]
