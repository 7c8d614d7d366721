"""Calling etcd while it may be briefly away (a restart, a leader election): retry with backoff
for a bounded time, then give up with the last error."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error

logger = logging.getLogger(__name__)
T = TypeVar("T")


def retry_etcd(call: Callable[[], T], what: str, timeout_s: float, first_wait_s: float = 0.25,
               max_wait_s: float = 4.0) -> T:
    """``call()``, tried again after each etcd error (waits doubling from ``first_wait_s`` up to
    ``max_wait_s``) until it succeeds or ``timeout_s`` has passed; then the last etcd error is
    raised. ``call`` must be safe to repeat after an etcd error. Other errors pass at once."""
    deadline = time.monotonic() + timeout_s
    wait_s, failures = first_wait_s, 0
    while True:
        try:
            result = call()
        except ETCD_ERRORS as exc:
            failures += 1
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                logger.error("%s: etcd still unreachable after %.0f s (%d tries): %s", what,
                             timeout_s, failures, describe_etcd_error(exc))
                raise
            if failures == 1:
                logger.warning("%s: etcd unreachable (%s); retrying for up to %.0f s", what,
                               describe_etcd_error(exc), timeout_s)
            time.sleep(min(wait_s, left_s))
            wait_s = min(2 * wait_s, max_wait_s)
            continue
        if failures:
            logger.info("%s: etcd answered after %d failed tries", what, failures)
        return result
