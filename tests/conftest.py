"""Shared fixtures: a real etcd server for the session, clients and isolated key prefixes."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from scission.worker.ports import find_free_port

# Kernels are decorated at import: the interpreter must be chosen before anything imports them.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests are skipped without a CUDA GPU. SCISSION_GPU_TESTS_ON_CPU=1
    runs them on the CPU instead (kernels under the Triton interpreter): slow, but it checks
    their harness on a machine without a GPU."""
    import torch

    if torch.cuda.is_available() or os.environ.get("SCISSION_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (set SCISSION_GPU_TESTS_ON_CPU=1 to run "
                                   "on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

PROMPTS = json.loads((Path(__file__).parent / "data" / "chat_prompts.json").read_text())

if TYPE_CHECKING:
    import etcd3

    from scission.cluster.etcd_server import EmbeddedEtcd


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EmbeddedEtcd]:
    """One etcd process on free loopback ports for the whole session; stopped at teardown."""
    # Imported here, not at module level: sessions without etcd tests need not load grpc/etcd3.
    from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig

    with EmbeddedEtcd(EmbeddedEtcdConfig(unsafe_no_fsync=True)) as server:
        yield server


@pytest.fixture
def etcd_client(etcd_server: EmbeddedEtcd) -> Iterator[etcd3.MultiEndpointEtcd3Client]:
    from scission.registry.workers import EtcdClientConfig, connect

    client = connect(EtcdClientConfig(endpoints=(etcd_server.endpoint,), timeout_s=5.0))
    yield client
    client.close()


@pytest.fixture
def etcd_prefix(etcd_client: etcd3.MultiEndpointEtcd3Client) -> Iterator[str]:
    """A fresh key prefix per test (tests share the session etcd); deleted afterwards."""
    prefix = f"/scission-test/{uuid.uuid4().hex[:12]}"
    yield prefix
    etcd_client.delete_prefix(prefix + "/")


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that was free when the test started."""
    return find_free_port()


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from scission.engine.tokenizer import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from scission.engine.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path)


@pytest.fixture(scope="session")
def chat_prompt_ids(tokenizer) -> list[list[int]]:
    """The 22 varied chat prompts of tests/data/chat_prompts.json, chat-templated."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> str:
    """A tiny random LLaVA checkpoint directory (tests/mm_fixtures.py), once a session."""
    from mm_fixtures import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory) -> str:
    """A tiny random Idefics3 (SmolVLM-style) checkpoint directory, once a session."""
    from mm_fixtures import make_tiny_idefics3

    return make_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))


@pytest.fixture(scope="session")
def sharp_idefics3_dir(tiny_idefics3_dir, tmp_path_factory) -> str:
    """The tiny Idefics3 with sharpened text attention (``mm_fixtures.sharpened_checkpoint``):
    its greedy tokens depend on the images, so a wrong embedding changes them."""
    from mm_fixtures import sharpened_checkpoint

    return sharpened_checkpoint(tiny_idefics3_dir, str(tmp_path_factory.mktemp("sharp_idefics3")))
