"""Shared fixtures: a real etcd server for the session, clients and isolated key prefixes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from scission.cluster.ports import find_free_port

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
    from scission.cluster.registry import EtcdClientConfig, connect

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
