"""Images through the full cluster: 1 encode + 1 prefill + 1 decode worker (real Ray, etcd,
NIXL) serving a tiny random Idefics3 checkpoint, against HF transformers' greedy tokens."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from serving_helpers import wait_until

from scission.cluster.client import GenerationResult, connect, generate
from scission.cluster.launcher import ClusterConfig, LocalCluster
from scission.cluster.launcher import worker_stub as launcher_worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.registry.workers import WorkerRole

NEW_TOKENS = 6
BLOCK_SIZE = 16
TEXT_VOCAB = 49152  # SmolLM2's; the processor's image tokens were added above it


def png(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [png(100, 60, 1), png(40, 40, 2), png(64, 96, 3, "JPEG"), png(30, 70, 4)]
# (text, image indices); the same text with images 0 and 1 checks that image blocks are
# never shared between two different images.
PROMPTS = [("What is in this image?", [0]), ("What is in this image?", [1]),
           ("Compare these two pictures.", [2, 3]), ("Describe it briefly.", [3]),
           ("Two again, in another order.", [1, 0]), ("And this one?", [2]),
           ("One more time.", [0]), ("Last one.", [1, 2])]


def chat_request(text: str, images: list[int], max_tokens: int = NEW_TOKENS) -> pb.GenerateRequest:
    parts = [pb.ContentPart(text=text)] + [
        pb.ContentPart(image=pb.Image(data=IMAGES[i], mime_type="image/png")) for i in images]
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", parts=parts)]),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


@pytest.fixture(scope="module")
def hf_reference(sharp_idefics3_dir) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy tokens) of every prompt from HF transformers itself."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(sharp_idefics3_dir)
    model = AutoModelForImageTextToText.from_pretrained(sharp_idefics3_dir,
                                                        dtype=torch.float32).eval()
    out = []
    for text, images in PROMPTS:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]
                     + [{"type": "image"}] * len(images)}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        pil = [Image.open(io.BytesIO(IMAGES[i])).convert("RGB") for i in images]
        inputs = processor(text=prompt, images=pil, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
        ids = inputs["input_ids"][0].tolist()
        out.append((ids, gen[0, len(ids):].tolist()))
    return out


@pytest.fixture(scope="module")
def epd_cluster(sharp_idefics3_dir):
    c = LocalCluster(ClusterConfig(
        num_encode=1, num_prefill=1, num_decode=1, threads_per_worker=1,
        engine=EngineConfig(model_path=sharp_idefics3_dir,
                            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=256))))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def worker_stats(cluster: LocalCluster, role: WorkerRole) -> wpb.WorkerStats:
    from scission.registry.directory import WorkerDirectory
    from scission.registry.workers import RegistryConfig
    from scission.registry.workers import connect as etcd_connect

    client = etcd_connect(cluster._etcd_cfg)
    directory = WorkerDirectory(client, RegistryConfig(prefix=cluster.config.registry_prefix))
    try:
        directory.start()
        (info,) = directory.workers(role)
    finally:
        directory.close()
        client.close()
    return launcher_worker_stub(info.endpoint, cluster.cluster_token).GetStats(
        wpb.StatsRequest(), timeout=10)


def run_all(address: str, requests: list[pb.GenerateRequest],
            in_flight: int) -> list[GenerationResult]:
    from concurrent.futures import ThreadPoolExecutor

    stub = connect(address)
    with ThreadPoolExecutor(in_flight) as ex:
        return list(ex.map(lambda r: generate(stub, r, timeout_s=300), requests))


def all_free(cluster: LocalCluster) -> bool:
    enc = worker_stats(cluster, WorkerRole.ENCODE)
    pre = worker_stats(cluster, WorkerRole.PREFILL)
    dec = worker_stats(cluster, WorkerRole.DECODE)
    return (enc.num_free_embedding_pages == enc.num_embedding_pages
            and pre.num_free_embedding_pages == pre.num_embedding_pages
            and pre.num_free_blocks == pre.num_blocks and pre.num_held == 0
            and dec.num_free_blocks == dec.num_blocks and dec.num_running == 0)


def test_epd_tokens_equal_hf_with_8_in_flight(epd_cluster, hf_reference):
    """Every image prompt, 8 in flight, gives exactly HF's greedy tokens and prompt length;
    images were encoded by the encode worker and repeated images came from its cache; the
    same text with another image shares no image block; afterwards every embedding page and
    KV block is free."""
    # The model's tokens depend on the image (same text, other image: other tokens), so a
    # wrong or misplaced embedding would show.
    assert hf_reference[0][1] != hf_reference[1][1]
    before = worker_stats(epd_cluster, WorkerRole.ENCODE)
    results = run_all(epd_cluster.router_address, [chat_request(t, i) for t, i in PROMPTS], 8)
    for k, (res, (ids, ref)) in enumerate(zip(results, hf_reference, strict=True)):
        assert res.error == "", res.error
        assert res.token_ids == ref, f"prompt {k} differs from HF"
        assert res.prompt_tokens == len(ids)
        assert res.images == len(PROMPTS[k][1])
    after = worker_stats(epd_cluster, WorkerRole.ENCODE)
    encoded = after.num_images_encoded_total - before.num_images_encoded_total
    hits = after.num_embedding_cache_hits_total - before.num_embedding_cache_hits_total
    num_images = sum(len(i) for _, i in PROMPTS)
    assert encoded == len(IMAGES)  # each distinct image once, concurrency included
    assert encoded + hits == num_images
    assert sum(r.cached_images for r in results) == hits
    wait_until(lambda: all_free(epd_cluster), 60, interval_s=0.5)


def test_same_image_cached_other_image_shares_no_block(epd_cluster):
    """Sequentially, with images of one size (equal segment tokens) and a fresh text: the
    same image again is a cache hit in the usage and reuses every full block; another image
    reuses only the blocks wholly before its segment, its image hash keeping the rest
    apart."""
    address = epd_cluster.router_address
    a, b = png(100, 60, 10), png(100, 60, 11)

    def ask(image: bytes) -> GenerationResult:
        req = chat_request("A fresh question about one picture, please.", [0])
        req.chat.messages[0].parts[1].image.data = image
        (res,) = run_all(address, [req], 1)
        assert res.error == "", res.error
        return res

    first, again, other = ask(a), ask(a), ask(b)
    assert (first.cached_images, again.cached_images, other.cached_images) == (0, 1, 0)
    assert again.token_ids == first.token_ids
    assert again.cached_tokens == (first.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    ids = hf_prompt_ids(epd_cluster.config.engine.model_path,
                        "A fresh question about one picture, please.", a)
    image_start = next(p for p, t in enumerate(ids) if t >= TEXT_VOCAB)  # the segment's 1st
    assert first.prompt_tokens == other.prompt_tokens == len(ids)
    assert other.cached_tokens == image_start // BLOCK_SIZE * BLOCK_SIZE


def hf_prompt_ids(model_dir: str, text: str, image: bytes) -> list[int]:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    return processor(text=prompt, images=[pil], return_tensors="pt")["input_ids"][0].tolist()


def test_text_only_requests_never_reach_the_encoder(epd_cluster):
    before = worker_stats(epd_cluster, WorkerRole.ENCODE)
    req = pb.GenerateRequest(prompt="The capital of France is",
                             sampling=pb.SamplingParams(temperature=0.0, max_tokens=4))
    results = run_all(epd_cluster.router_address, [req] * 4, 4)
    assert all(r.error == "" and r.images == 0 for r in results)
    after = worker_stats(epd_cluster, WorkerRole.ENCODE)
    assert (after.num_images_encoded_total, after.num_embedding_cache_hits_total) == \
        (before.num_images_encoded_total, before.num_embedding_cache_hits_total)


def test_cancelled_requests_free_pages_and_blocks(epd_cluster):
    """Streams cancelled after their first token leave no pinned page and no used block."""
    stub = connect(epd_cluster.router_address)
    for k in range(3):
        call = stub.Generate(chat_request(PROMPTS[k][0], PROMPTS[k][1], max_tokens=200),
                             timeout=120)
        next(iter(call))
        call.cancel()
    wait_until(lambda: all_free(epd_cluster), 60, interval_s=0.5)


def test_bad_image_is_invalid_argument_and_costs_nothing(epd_cluster, hf_reference):
    bad = chat_request("What is this?", [0])
    bad.chat.messages[0].parts[1].image.data = IMAGES[0][: len(IMAGES[0]) // 2]
    res = run_all(epd_cluster.router_address, [bad, chat_request(*PROMPTS[3])], 2)
    assert res[0].error.startswith("INVALID_ARGUMENT") and "image 0" in res[0].error
    assert res[1].error == "" and res[1].token_ids == hf_reference[3][1]


def test_killed_encoder_falls_back_to_local_encoding(epd_cluster, hf_reference):
    """With the only encode worker killed, images are encoded by the prefill worker and the
    tokens stay HF's (runs last: the encoder does not come back)."""
    epd_cluster.kill_worker("encode-0")
    res = run_all(epd_cluster.router_address, [chat_request(*PROMPTS[5])], 1)[0]
    assert res.error == "", res.error
    assert res.token_ids == hf_reference[5][1]
