"""retry_etcd: an etcd call retried with backoff for a bounded time."""

from __future__ import annotations

import time

import pytest
from etcd3.exceptions import ConnectionFailedError

from scission.registry.etcd_retry import retry_etcd


def test_retries_etcd_errors_until_the_call_succeeds():
    """Two ConnectionFailedErrors then a value: the value is returned after exactly 3 calls,
    waiting 0.01 + 0.02 s in between."""
    calls = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionFailedError()
        return "ok"

    assert retry_etcd(call, "test", timeout_s=5, first_wait_s=0.01) == "ok"
    assert len(calls) == 3
    assert calls[2] - calls[0] >= 0.03


def test_gives_up_with_the_etcd_error_after_the_timeout():
    """An etcd that never answers: the last error is raised once timeout_s has passed, not
    before and not much after."""
    start = time.monotonic()
    with pytest.raises(ConnectionFailedError):
        retry_etcd(lambda: (_ for _ in ()).throw(ConnectionFailedError()), "test",
                   timeout_s=0.3, first_wait_s=0.05, max_wait_s=0.1)
    assert 0.3 <= time.monotonic() - start < 1.0


def test_other_errors_pass_at_once():
    """A non-etcd error is not retried."""
    calls = []

    def call() -> None:
        calls.append(1)
        raise KeyError("not etcd")

    with pytest.raises(KeyError):
        retry_etcd(call, "test", timeout_s=5)
    assert calls == [1]
