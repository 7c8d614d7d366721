"""KV-index publisher against a real etcd: exact keys, batching bounds, CLEARED, new leases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kv_index_helpers import make_info, stored, wait_until

from scission.engine.kv_events import KVEvent, KVEventKind
from scission.registry.etcd_watch import ETCD_ERRORS
from scission.registry.kv_index import (
    KVEventPublisher,
    KVIndexConfig,
    kv_key,
    kv_prefix,
    parse_kv_key,
)
from scission.registry.workers import RegistryConfig, WorkerRegistration

WORKER = "prefill-0"


@pytest.fixture
def registry(etcd_prefix: str) -> RegistryConfig:
    return RegistryConfig(prefix=etcd_prefix, retry_interval_s=0.1)


@pytest.fixture
def lease(etcd_client) -> Iterator[int]:
    lease = etcd_client.lease(30)
    yield lease.id
    etcd_client.revoke_lease(lease.id)


def make_publisher(etcd_client, registry: RegistryConfig, lease_id: int | None = None,
                   **config) -> KVEventPublisher:
    publisher = KVEventPublisher(etcd_client, registry, WORKER, KVIndexConfig(**config))
    if lease_id is not None:
        publisher.set_lease(lease_id)
    return publisher


def etcd_index(etcd_client, registry: RegistryConfig) -> dict[str, set[int]]:
    """worker_id -> hashes, read straight from etcd."""
    out: dict[str, set[int]] = {}
    prefix = kv_prefix(registry.prefix)
    for _, meta in etcd_client.get_prefix(prefix, keys_only=True):
        worker_id, block_hash = parse_kv_key(prefix, meta.key.decode())
        out.setdefault(worker_id, set()).add(block_hash)
    return out


def test_key_schema_round_trips():
    """Keys are {prefix}/kv/{worker}/{hash:016x}; parse inverts them; junk parses to None."""
    key = kv_key("/p", "decode-0", 0xAB)
    assert key == "/p/kv/decode-0/00000000000000ab"
    assert parse_kv_key("/p/kv/", key) == ("decode-0", 0xAB)
    assert parse_kv_key("/p/kv/", kv_key("/p", "w", 2**64 - 1)) == ("w", 2**64 - 1)
    for junk in ("/p/kv/w", "/p/kv/w/xyz", "/p/kv//00000000000000ab", "/q/kv/w/00000000000000ab",
                 "/p/kv/w/000000000000000g"):
        assert parse_kv_key("/p/kv/", junk) is None


def test_one_flush_writes_the_net_set_in_txns_of_128(etcd_client, registry, lease):
    """300 stored then 50 of them removed before the flush: exactly 250 puts (the 50 cost
    nothing) in ceil(250 / 128) = 2 txns, every key under the lease, values empty."""
    publisher = make_publisher(etcd_client, registry, lease)
    publisher.submit([stored(0, range(300)), KVEvent(1, KVEventKind.REMOVED, tuple(range(50)))])
    assert publisher.flush() == 250
    assert etcd_index(etcd_client, registry) == {WORKER: set(range(50, 300))}
    c = publisher.counters
    assert (c.num_txns, c.num_put_ops, c.num_delete_ops, c.num_events) == (2, 250, 0, 2)
    for value, meta in etcd_client.get_prefix(kv_prefix(registry.prefix)):
        assert value == b"" and meta.lease_id == lease
    assert publisher.flush() == 0  # nothing pending
    assert publisher.counters.num_txns == 2


def test_flush_is_bounded_and_the_rest_waits(etcd_client, registry, lease):
    """With max_ops_per_flush = 128, 300 pending puts take 3 flushes (128, 128, 44)."""
    publisher = make_publisher(etcd_client, registry, lease, max_ops_per_flush=128)
    publisher.submit([stored(0, range(1000, 1300))])
    assert [publisher.flush() for _ in range(4)] == [128, 128, 44, 0]
    assert etcd_index(etcd_client, registry) == {WORKER: set(range(1000, 1300))}
    assert KVIndexConfig(max_ops_per_flush=128).max_ops_per_s == 1280
    assert KVIndexConfig().max_txns_per_s == 80


def test_removed_blocks_are_deleted(etcd_client, registry, lease):
    """A REMOVED after the put was published becomes one delete; store-remove-store ends
    stored."""
    publisher = make_publisher(etcd_client, registry, lease)
    publisher.submit([stored(0, [1, 2, 3])])
    publisher.flush()
    publisher.submit([KVEvent(1, KVEventKind.REMOVED, (2,)), KVEvent(2, KVEventKind.REMOVED, (3,)),
                      stored(3, [3])])
    assert publisher.flush() == 1
    assert etcd_index(etcd_client, registry) == {WORKER: {1, 3}}
    assert publisher.counters.num_delete_ops == 1


def test_cleared_is_one_range_delete_then_the_survivors(etcd_client, registry, lease):
    """CLEARED + STORED(survivors) (BlockManager.reset_prefix_cache) becomes one range delete
    of the worker's keys, then puts of the survivors; another worker's keys are untouched."""
    other = KVEventPublisher(etcd_client, registry, "decode-0")
    other.set_lease(lease)
    other.submit([stored(0, [7])])
    other.flush()
    publisher = make_publisher(etcd_client, registry, lease)
    publisher.submit([stored(0, range(10))])
    publisher.flush()
    publisher.submit([KVEvent(1, KVEventKind.CLEARED, ()), stored(2, [4, 5])])
    assert publisher.flush() == 3
    assert etcd_index(etcd_client, registry) == {WORKER: {4, 5}, "decode-0": {7}}
    assert publisher.counters.num_range_deletes == 1


def test_out_of_order_events_are_ignored(etcd_client, registry, lease):
    """An event whose id is not above the last one is counted and ignored."""
    publisher = make_publisher(etcd_client, registry, lease)
    publisher.submit([stored(5, [1]), stored(5, [2]), stored(3, [3]), stored(6, [4])])
    publisher.flush()
    assert etcd_index(etcd_client, registry) == {WORKER: {1, 4}}
    assert publisher.counters.num_out_of_order == 2


def test_nothing_is_written_without_a_lease(etcd_client, registry, lease):
    """Events before registration are kept and written once a lease is set."""
    publisher = make_publisher(etcd_client, registry)
    publisher.submit([stored(0, [1, 2])])
    assert publisher.flush() == 0
    publisher.set_lease(lease)
    assert publisher.flush() == 2
    assert etcd_index(etcd_client, registry) == {WORKER: {1, 2}}


def test_new_lease_republishes_every_held_block(etcd_client, registry):
    """When the lease dies its keys vanish; set_lease(new) puts every held hash again under the
    new lease (and a write with the dead lease fails and stays pending)."""
    old, new = etcd_client.lease(30), etcd_client.lease(30)
    publisher = make_publisher(etcd_client, registry, old.id)
    publisher.submit([stored(0, range(200))])
    publisher.flush()
    etcd_client.revoke_lease(old.id)
    assert etcd_index(etcd_client, registry) == {}
    publisher.submit([KVEvent(1, KVEventKind.REMOVED, (0,)), stored(2, [500])])
    with pytest.raises(ETCD_ERRORS, match="lease"):  # one txn: the delete fails with the put
        publisher.flush()
    assert publisher.counters.num_errors == 1
    publisher.set_lease(new.id)
    assert publisher.flush() == 200
    assert etcd_index(etcd_client, registry) == {WORKER: set(range(1, 200)) | {500}}
    assert {m.lease_id for _, m in etcd_client.get_prefix(kv_prefix(registry.prefix))} == {new.id}
    etcd_client.revoke_lease(new.id)


def test_lost_registration_lease_republishes_through_the_callback(etcd_client, registry):
    """WorkerRegistration re-registers after its lease is revoked behind its back and calls
    on_new_incarnation; wired to set_lease, the publisher's thread re-publishes under it."""
    publisher = make_publisher(etcd_client, registry, flush_interval_s=0.05)
    registration = WorkerRegistration(etcd_client, registry,
                                      on_new_incarnation=lambda i: publisher.set_lease(
                                          i.incarnation))
    with registration:
        info = registration.register(make_info(WORKER), ttl_s=3)
        publisher.set_lease(info.incarnation)
        publisher.start()
        publisher.submit([stored(0, [11, 12, 13])])
        wait_until(lambda: etcd_index(etcd_client, registry) == {WORKER: {11, 12, 13}})
        etcd_client.revoke_lease(info.incarnation)
        wait_until(lambda: registration.info is not None
                   and registration.info.incarnation != info.incarnation, timeout_s=5)
        wait_until(lambda: etcd_index(etcd_client, registry) == {WORKER: {11, 12, 13}})
        leases = {m.lease_id for _, m in etcd_client.get_prefix(kv_prefix(registry.prefix))}
        assert leases == {registration.info.incarnation}
        publisher.close()
