"""Images through the router's real doors (one process: a RouterServer with gRPC + HTTP,
etcd, the fake workers of ``gated_workers.py``): the default model is text-only, so a chat
request with an image gets INVALID_ARGUMENT / HTTP 400 naming the model and the image's
field, is counted like any bad request, and costs nothing else (no worker call)."""

from __future__ import annotations

import base64
import time

import grpc
import httpx
import pytest
from gated_workers import serve_gated_workers
from image_bytes import encoded

from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.router.config import RouterConfig
from scission.router.server import RouterServer

MODEL = "SmolLM2-135M-Instruct.Q4_1"
PNG = encoded("PNG", 16, 16)


@pytest.fixture
def router(etcd_server, etcd_prefix, etcd_client):
    """A started RouterServer (HTTP door on) with the fake worker pair registered."""
    cfg = RouterConfig(etcd=EtcdClientConfig(endpoints=(etcd_server.endpoint,)),
                       registry=RegistryConfig(prefix=etcd_prefix), http_port=0)
    server = RouterServer(cfg).start()
    with serve_gated_workers(etcd_client, etcd_prefix) as worker:
        deadline = time.monotonic() + 10
        while len(server.directory.workers()) < 2:
            assert time.monotonic() < deadline, "fake workers not discovered"
            time.sleep(0.02)
        server.worker = worker
        yield server
    server.stop()


def invalid_count(router: RouterServer) -> float:
    return router.metrics.registry.get_sample_value(
        "scission_router_requests_total", {"status": "invalid_argument"}) or 0.0


def test_image_to_text_only_model_over_grpc(router):
    """gRPC: INVALID_ARGUMENT "chat.messages[1].parts[1].image: model ... does not accept
    images", counted; no worker call; a text request right after is served."""
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(router.address))
    parts = [pb.ContentPart(text="what is this?"),
             pb.ContentPart(image=pb.Image(data=PNG, mime_type="image/png"))]
    req = pb.GenerateRequest(chat=pb.ChatMessages(messages=[
        pb.ChatMessage(role="system", content="be brief"),
        pb.ChatMessage(role="user", parts=parts)]), sampling=pb.SamplingParams(max_tokens=2))
    before = invalid_count(router)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req, timeout=30))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (f"chat.messages[1].parts[1].image: model {MODEL} does not "
                                   "accept images")
    assert invalid_count(router) == before + 1
    assert router.worker.prompts == []
    del req.chat.messages[1].parts[1]  # the same chat, text only
    assert [t for c in stub.Generate(req, timeout=30) for t in c.token_ids][:1] == [7]


def test_image_to_text_only_model_over_http(router):
    """HTTP: 400 with the OpenAI error object, ``param`` the content part's image_url; a
    remote URL and bad base64 are 400s too; none reaches a worker."""
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    cases = [(uri, "messages[0].content[1].image_url", "invalid_argument",
              f"chat.messages[0].parts[1].image: model {MODEL} does not accept images"),
             ("https://example.com/a.png", "messages[0].content[1].image_url.url",
              "unsupported_parameter", "remote image URLs are not fetched"),
             ("data:image/png;base64,@@@", "messages[0].content[1].image_url.url",
              "invalid_request", "invalid base64")]
    with httpx.Client(base_url=f"http://{router.http_address}", timeout=30) as client:
        for url, param, code, message in cases:
            content = [{"type": "text", "text": "what is this?"},
                       {"type": "image_url", "image_url": {"url": url}}]
            resp = client.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 2,
                "messages": [{"role": "user", "content": content}]})
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert (error["param"], error["code"], error["type"]) == (
                param, code, "invalid_request_error")
            assert message in error["message"], error
    assert router.worker.prompts == []
