"""The router's encode step (``router/encode_step.py``) over the real ``WorkerPool``, ``Placer``,
``PrefixIndex``, tokenizer and processor of a tiny Idefics3, with encode-worker doubles that
answer as a worker would (the real segment and hash of each image): which worker encodes each
image, the built prompt against HF's processor, retries and refusals."""

from __future__ import annotations

import io

import grpc
import msgpack
import numpy as np
import pytest
from test_flows_repick import FakeDirectory

from scission.engine.mm_processor import MultimodalProcessor
from scission.engine.request import InvalidRequestError, SamplingParams
from scission.engine.tokenizer import load_tokenizer
from scission.kv_transfer.embeddings import EmbeddingHandle
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.config import PlacementConfig
from scission.router.convert import ValidatedRequest
from scission.router.encode_step import EncodeStep
from scission.router.images import ImageData
from scission.router.placement import Placer
from scission.router.prefix_index import PrefixIndex
from scission.router.worker_pool import WorkerPool
from scission.worker.embedding_cache import index_key

E, P, D = WorkerRole.ENCODE, WorkerRole.PREFILL, WorkerRole.DECODE


def image(seed: int, size=(60, 40)) -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_info(worker_id: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, endpoint=f"{worker_id}:1", agent_name="a",
                      agent_metadata=b"", kv_layout=msgpack.packb({}), num_blocks=100,
                      block_size=16, model_id="m", started_at_s=0.0, incarnation=1,
                      accepts_images=True)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class EncodeStub:
    """Answers Encode like a worker (real segment and hash), or fails with ``fail``."""

    def __init__(self, worker_id: str, processor: MultimodalProcessor, log: list,
                 fail: grpc.StatusCode | None = None) -> None:
        self.worker_id, self.processor, self.log, self.fail = worker_id, processor, log, fail
        self.released: list[str] = []

    def Encode(self, req: wpb.EncodeRequest, timeout=None) -> wpb.EncodeResponse:
        self.log.append((self.worker_id, req.image))
        if self.fail is not None:
            raise FakeRpcError(self.fail, f"{self.worker_id} failed")
        seg = self.processor.process_image(req.image)
        handle = EmbeddingHandle(pin_id=f"pin-{len(self.log)}", encode_worker_id=self.worker_id,
                                 incarnation=1, agent_name="a", image_hash=seg.image_hash,
                                 page_ids=(0,), num_embeddings=1, hidden_size=1, page_tokens=64,
                                 dtype="float32")
        return wpb.EncodeResponse(token_ids=seg.token_ids, image_hash=seg.image_hash,
                                  num_embeddings=seg.num_embeddings,
                                  embedding_handle=handle.to_bytes())


@pytest.fixture(scope="module")
def mm(tiny_idefics3_dir):
    return load_tokenizer(tiny_idefics3_dir), MultimodalProcessor.from_pretrained(
        tiny_idefics3_dir)


def make_step(mm, workers: list[WorkerInfo], fail: dict | None = None,
              held: dict[str, set[int]] | None = None):
    tokenizer, processor = mm
    directory = FakeDirectory(workers)
    pool = WorkerPool(directory)
    log: list = []
    stubs = {w.worker_id: EncodeStub(w.worker_id, processor, log, (fail or {}).get(w.worker_id))
             for w in workers}
    pool.stub = lambda info: stubs[info.worker_id]
    index = PrefixIndex()
    index.reset({w.worker_id for w in workers}, held or {})
    step = EncodeStep(pool, Placer(PlacementConfig(), pool), tokenizer, processor, index, 10.0,
                      max_parallel=1)  # one at a time: the choices are deterministic
    return step, pool, log


def request(images: list[bytes], text: str = "Compare them.") -> ValidatedRequest:
    parts = [{"type": "text", "text": text}] + [{"type": "image", "index": i}
                                                 for i in range(len(images))]
    return ValidatedRequest(
        "r-1", [], SamplingParams(max_tokens=4), "c-1",
        chat_messages=[{"role": "user", "content": parts}],
        images=tuple(ImageData(i, data, "PNG", 60, 40) for i, data in enumerate(images)))


def hf_input_ids(model_dir: str, text: str, images: list[bytes]) -> list[int]:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]
                 + [{"type": "image"}] * len(images)}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    pil = [Image.open(io.BytesIO(d)).convert("RGB") for d in images]
    return processor(text=prompt, images=pil, return_tensors="pt")["input_ids"][0].tolist()


def test_images_spread_over_encoders_and_the_prompt_is_hfs(mm, tiny_idefics3_dir):
    """Three images, two idle encoders: the step counts each call before choosing the next,
    so they alternate; the built prompt equals HF's processor output and each ref points at
    its image's segment."""
    images = [image(1), image(2, (90, 30)), image(3)]
    step, pool, log = make_step(mm, [make_info("encode-0", E), make_info("encode-1", E),
                                     make_info("prefill-0", P), make_info("decode-0", D)])
    vr = step.prepare(request(images))
    assert [w for w, _ in log] == ["encode-0", "encode-1", "encode-0"]
    assert vr.prompt_token_ids == hf_input_ids(tiny_idefics3_dir, "Compare them.", images)
    processor = mm[1]
    for ref, data in zip(vr.image_refs, images, strict=True):
        seg = processor.process_image(data)
        assert vr.prompt_token_ids[ref.offset:ref.offset + ref.length] == list(seg.token_ids)
        assert ref.image_hash == seg.image_hash
    assert [w.worker_id for w, _ in vr.image_pins] == ["encode-0", "encode-1", "encode-0"]
    assert all(pool.load(make_info(w, E)).num_running == 0 for w in ("encode-0", "encode-1"))


def test_an_encoder_holding_the_image_wins_over_a_less_loaded_one(mm):
    data = image(7)
    key = index_key(mm[1].image_hash(data))
    step, pool, log = make_step(mm, [make_info("encode-0", E), make_info("encode-1", E)],
                                held={"encode-1": {key}})
    pool.begin("encode-1")  # encode-1 is busier, but holds the image
    step.prepare(request([data]))
    assert [w for w, _ in log] == ["encode-1"]


def test_a_failed_encoder_is_skipped_and_marked_suspect(mm):
    step, pool, log = make_step(mm, [make_info("encode-0", E), make_info("encode-1", E)],
                                fail={"encode-0": grpc.StatusCode.UNAVAILABLE})
    vr = step.prepare(request([image(4)]))
    assert [w for w, _ in log] == ["encode-0", "encode-1"]
    assert step.num_retries == 1 and [w.worker_id for w, _ in vr.image_pins] == ["encode-1"]
    assert [w.worker_id for w in pool.workers(E)] == ["encode-1"]  # encode-0 is suspect


def test_without_an_encode_pool_the_prefill_worker_encodes(mm):
    step, _, log = make_step(mm, [make_info("prefill-0", P), make_info("decode-0", D)])
    step.prepare(request([image(5)]))
    assert [w for w, _ in log] == ["prefill-0"]


def test_an_image_the_worker_cannot_decode_names_its_index(mm):
    step, _, _ = make_step(mm, [make_info("encode-0", E)],
                           fail={"encode-0": grpc.StatusCode.INVALID_ARGUMENT})
    with pytest.raises(InvalidRequestError) as e:
        step.prepare(request([image(6)]))
    assert e.value.field == "images[0]"


def test_without_an_encode_pool_a_prefill_worker_holding_the_image_encodes_it(mm):
    """EP-D: prefill workers publish their cached images to the embedding index; a repeated
    image goes to the one holding it, not to the placer's pick (which would encode it again)."""
    data = image(9)
    key = index_key(mm[1].image_hash(data))
    step, _, log = make_step(mm, [make_info("prefill-0", P), make_info("prefill-1", P),
                                  make_info("decode-0", D)], held={"prefill-1": {key}})
    step.prepare(request([data]))
    assert [w for w, _ in log] == ["prefill-1"]
