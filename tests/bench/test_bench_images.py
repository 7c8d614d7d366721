"""The image benchmark's pure parts: the image plan, generated images, the chat request, the
deployment specs, and the hit-rate arithmetic (no cluster, no model)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from scission.bench.arrivals import ArrivalConfig, ArrivalKind
from scission.bench.images import parse_deployments
from scission.bench.images_report import metric_ratios, run_key, run_metrics, table_rows
from scission.bench.images_workload import (
    QUESTIONS,
    ImageSpec,
    ImageWorkloadConfig,
    build_image_workload,
    make_image,
    plan_images,
)
from scission.bench.loadgen import make_request
from scission.bench.metrics import RequestRecord, SloConfig, summarize
from scission.bench.prompts import PromptBuilder
from scission.bench.runner import BenchResult
from scission.bench.side_by_side import Deployment
from scission.bench.side_by_side_report import DeploymentRuns
from scission.bench.workload import ImagePart, WorkloadRequest

SLO = SloConfig(ttft_slo_ms=1000.0, tpot_slo_ms=100.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_counts_reuses_and_best_hit_rate(seed):
    """Every request has 1-4 images, never one twice; a reused image always comes from an
    earlier request; images are numbered in order of first use; the best hit rate is the
    share of occurrences that are not an image's first; the plan is a function of the seed."""
    cfg = ImageWorkloadConfig(num_requests=40, repeat_share=0.5, seed=seed)
    plan = plan_images(cfg)
    assert plan == plan_images(cfg)
    seen: set[int] = set()
    first_uses = 0
    for chosen in plan.requests:
        assert 1 <= len(chosen) <= 4 and len(set(chosen)) == len(chosen)
        new = [i for i in chosen if i not in seen]
        assert new == list(range(len(seen), len(seen) + len(new)))  # numbered by first use
        first_uses += len(new)
        seen |= set(chosen)
    assert first_uses == len(plan.images) == len(seen)
    assert plan.num_occurrences == sum(len(r) for r in plan.requests)
    assert plan.repeat_share == pytest.approx(1 - len(plan.images) / plan.num_occurrences)
    assert 0.25 < plan.repeat_share < 0.55  # first requests have nothing to reuse


def test_plan_without_repeats_and_with_one_image():
    """repeat_share 0: every occurrence is a new image (best hit rate 0); min = max = 1:
    exactly one image per request."""
    plan = plan_images(ImageWorkloadConfig(num_requests=10, repeat_share=0.0))
    assert plan.repeat_share == 0.0
    assert [i for r in plan.requests for i in r] == list(range(len(plan.images)))
    single = plan_images(ImageWorkloadConfig(num_requests=10, min_images=1, max_images=1))
    assert all(len(r) == 1 for r in single.requests)


def test_bad_workload_config_is_refused():
    with pytest.raises(ValueError):
        ImageWorkloadConfig(min_images=3, max_images=2)
    with pytest.raises(ValueError):
        ImageWorkloadConfig(repeat_share=1.0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_make_image_is_seeded_sized_and_variant_changes_pixels(fmt):
    """Same (spec, seed, variant) -> same bytes; the file decodes to the spec's size and
    format; another variant or seed gives other bytes of the same size."""
    from PIL import Image

    spec = ImageSpec(index=3, width=320, height=200, fmt=fmt)
    data = make_image(spec, seed=0, variant=1)
    assert data == make_image(spec, seed=0, variant=1)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size) == (fmt, (320, 200))
    for other in (make_image(spec, 0, 2), make_image(spec, 1, 1)):
        assert other != data
        with Image.open(io.BytesIO(other)) as im:
            assert im.size == (320, 200)


class _CharTokenizer:
    def encode(self, text, *args, **kwargs):
        return [ord(c) for c in text]

    def decode(self, ids, *args, **kwargs):
        return "".join(chr(i) for i in ids)


def test_workload_requests_share_bytes_of_repeated_images():
    """A request's images are its plan entries' bytes (one bytes object per distinct image,
    so a repeat is byte-identical); its text is a corpus passage and a question; a chat
    request has no token ids; the output lengths are the config's."""
    cfg = ImageWorkloadConfig(num_requests=6, repeat_share=0.6, seed=3)
    plan = plan_images(cfg)
    builder = PromptBuilder(np.arange(97, 123, dtype=np.int32), seed=0)  # "a".."z"
    wl = build_image_workload(cfg, plan, builder, _CharTokenizer(), variant=1)
    assert len(wl.requests) == 6
    by_index: dict[int, bytes] = {}
    for req, chosen in zip(wl.requests, plan.requests, strict=True):
        assert req.is_chat and req.prompt_token_ids == () and req.output_tokens == 32
        passage, question = req.text.split("\n")
        assert passage.isalpha() and question in QUESTIONS
        for k, part in zip(chosen, req.images, strict=True):
            assert by_index.setdefault(k, part.data) == part.data
    assert len(by_index) == len(plan.images)


def test_chat_request_carries_text_then_images():
    """An image request becomes one user chat message: the text part, then each image with
    its MIME type; greedy, exact output length."""
    req = WorkloadRequest("r", (), 7, 0.0, text="Describe.",
                          images=(ImagePart(b"\x89PNG..", "image/png"),
                                  ImagePart(b"\xff\xd8..", "image/jpeg")))
    msg = make_request(req, "r.1")
    assert msg.request_id == "r.1" and msg.WhichOneof("input") == "chat"
    (m,) = msg.chat.messages
    assert m.role == "user" and m.parts[0].text == "Describe."
    assert [(p.image.data, p.image.mime_type) for p in m.parts[1:]] == [
        (b"\x89PNG..", "image/png"), (b"\xff\xd8..", "image/jpeg")]
    assert (msg.sampling.max_tokens, msg.sampling.temperature, msg.sampling.ignore_eos) == \
        (7, 0.0, True)


def test_parse_deployments():
    deps = parse_deployments("EP-D=1p1d, E-P-D=1e1p1d,wide=2P1D,colocated=2c")
    assert deps == (Deployment("EP-D", num_prefill=1, num_decode=1),
                    Deployment("E-P-D", num_prefill=1, num_decode=1, num_encode=1),
                    Deployment("wide", num_prefill=2, num_decode=1),
                    Deployment("colocated", num_colocated=2))
    assert deps[1].num_workers == 3
    for bad in ("EP-D=1p", "a=1p1d,a=2c", "solo=2c", "x=1q1d", "=1p1d,b=2c"):
        with pytest.raises(ValueError):
            parse_deployments(bad)


def _record(rid: str, images: int, cached: int, ttft_s: float, ok: bool = True):
    if not ok:
        return RequestRecord(rid, 50, 0, 0.0, end_s=0.1, error="INTERNAL", images=images)
    return RequestRecord(rid, 50, 3, 0.0, (ttft_s, ttft_s + 0.1, ttft_s + 0.2), (1, 1, 1),
                         end_s=ttft_s + 0.2, images=images, cached_images=cached)


def _run(label: str, arrival: ArrivalConfig, records: list[RequestRecord]) -> BenchResult:
    return BenchResult(label, "addr", "images", arrival, tuple(records),
                       summarize(records, 10.0, SLO))


POISSON = ArrivalConfig(ArrivalKind.POISSON, rate_rps=0.5)
CLOSED = ArrivalConfig(ArrivalKind.CONCURRENCY, concurrency=6)


def test_hit_rate_counts_succeeded_requests_only():
    """Hit rate = cached / images over the succeeded requests (a failed request's images are
    in neither); None when no image was sent."""
    run = _run("a", POISSON, [_record("x", 4, 1, 0.5), _record("y", 2, 2, 1.5),
                              _record("z", 3, 0, 0.0, ok=False)])
    s = run.summary
    assert (s.images, s.cached_images, s.image_cache_hit_rate) == (6, 3, 0.5)
    assert s.to_dict()["image_cache_hit_rate"] == 0.5
    assert summarize([], 1.0, SLO).image_cache_hit_rate is None
    m = run_metrics(run)
    assert m["ttft_p50_ms"] == pytest.approx(1000.0) and m["request_rps"] == pytest.approx(0.2)


def test_table_rows_and_ratios_against_the_baseline():
    """Runs are keyed by their load; each non-baseline row is followed by its ratios to the
    baseline (TTFT p50 2000/1000 ms = 2x; same request rate = 1x)."""
    base = DeploymentRuns("EP-D", (_run("b", POISSON, [_record("x", 2, 1, 1.0)]),
                                   _run("b", CLOSED, [_record("x", 2, 0, 1.0)])), None)
    other = DeploymentRuns("E-P-D", (_run("o", POISSON, [_record("x", 2, 2, 2.0)]),
                                     _run("o", CLOSED, [_record("x", 2, 0, 0.5)])), None)
    assert [run_key(r) for r in base.runs] == ["0.5 rps", "6 in flight"]
    q = metric_ratios(run_metrics(other.runs[0]), run_metrics(base.runs[0]))
    assert q["ttft_p50_ms"] == pytest.approx(2.0) and q["request_rps"] == pytest.approx(1.0)
    assert "image_cache_hit_rate" not in q
    rows = table_rows([base, other])
    assert [r[:2] for r in rows] == [["0.5 rps", "EP-D"], ["0.5 rps", "E-P-D"],
                                     ["", "E-P-D/EP-D"], ["6 in flight", "EP-D"],
                                     ["6 in flight", "E-P-D"], ["", "E-P-D/EP-D"]]
    assert rows[1][8:] == ["2/2", "1.00"] and rows[2][3] == "2.00x"
