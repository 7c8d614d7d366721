"""SloPublisher against a real etcd: the windows under one lease, gone when it stops."""

from __future__ import annotations

import time
from collections.abc import Callable

from scission.registry.metrics import SloWindow, slo_key, slo_prefix
from scission.registry.slo_publisher import SloPublisher
from scission.registry.workers import RegistryConfig

ROUTER_ID = "router-0123abcd"


def make_window(scope: str, num_finished: int) -> SloWindow:
    return SloWindow(router_id=ROUTER_ID, scope=scope, window_s=30.0, updated_at_s=1000.0,
                     slo_ttft_ms=2000.0, slo_tpot_ms=150.0, num_arrivals=num_finished + 1,
                     num_finished=num_finished, num_failed=0, arrival_rps=0.5,
                     mean_prompt_tokens=120.0, mean_output_tokens=40.0, queue_p90_ms=0.4,
                     ttft_p50_ms=300.0, ttft_p90_ms=900.0, tpot_p50_ms=40.0, tpot_p90_ms=70.0,
                     itl_p90_ms=65.0, e2e_p90_ms=4000.0, ttft_attainment=0.9,
                     tpot_attainment=1.0, attainment=0.9, goodput_rps=0.45)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def published(client, prefix: str) -> dict[str, tuple[SloWindow, int]]:
    """key -> (record, lease id) under the SLO prefix."""
    return {meta.key.decode(): (SloWindow.from_bytes(value), meta.lease_id)
            for value, meta in client.get_prefix(slo_prefix(prefix))}


def test_publishes_every_scope_under_one_lease_and_revokes(etcd_client, etcd_prefix):
    """Every scope's window is at slo_key(prefix, router_id, scope), all under the publisher's
    lease; later rounds carry the source's new values; close() revokes: the keys are gone."""
    rounds = [0]

    def source() -> list[SloWindow]:
        rounds[0] += 1
        return [make_window("cluster", rounds[0]), make_window("decode", rounds[0])]

    publisher = SloPublisher(etcd_client, RegistryConfig(prefix=etcd_prefix), ROUTER_ID, source,
                             interval_s=0.05).start()
    try:
        keys = {slo_key(etcd_prefix, ROUTER_ID, s) for s in ("cluster", "decode")}
        wait_for(lambda: set(published(etcd_client, etcd_prefix)) == keys)
        wait_for(lambda: all(w.num_finished >= 3
                             for w, _ in published(etcd_client, etcd_prefix).values()))
        got = published(etcd_client, etcd_prefix)
        assert {lease for _, lease in got.values()} == {publisher.lease_id}
        window, _ = got[slo_key(etcd_prefix, ROUTER_ID, "decode")]
        assert window == make_window("decode", window.num_finished)
        ttl = etcd_client.get_lease_info(publisher.lease_id).grantedTTL
        assert ttl == 5
    finally:
        publisher.close()
    assert published(etcd_client, etcd_prefix) == {}
    assert publisher.num_errors == 0


def test_source_errors_and_lost_lease_are_retried(etcd_client, etcd_prefix):
    """A source that raises is counted, not propagated; a lease revoked behind the
    publisher's back is replaced by a new one and the windows come back under it."""
    calls = [0]

    def source() -> list[SloWindow]:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("first round fails")
        return [make_window("cluster", 1)]

    registry = RegistryConfig(prefix=etcd_prefix, retry_interval_s=0.05)
    publisher = SloPublisher(etcd_client, registry, ROUTER_ID, source, interval_s=0.05,
                             ttl_s=3).start()
    try:
        key = slo_key(etcd_prefix, ROUTER_ID, "cluster")
        wait_for(lambda: key in published(etcd_client, etcd_prefix))
        assert publisher.num_errors >= 1
        first_lease = publisher.lease_id
        etcd_client.revoke_lease(first_lease)
        wait_for(lambda: key in published(etcd_client, etcd_prefix)
                 and published(etcd_client, etcd_prefix)[key][1] != first_lease)
        assert published(etcd_client, etcd_prefix)[key][1] == publisher.lease_id
    finally:
        publisher.close()
    assert published(etcd_client, etcd_prefix) == {}
