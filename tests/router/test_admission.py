"""Admission control counters (router/admission.py): pure, no I/O."""

from __future__ import annotations

import pytest

from scission.router.admission import Admission, AdmissionStats, OverCapacityError


def test_request_bound_and_release() -> None:
    """At most max_requests tickets live at once; a released ticket frees its slot, and
    releasing twice changes nothing."""
    adm = Admission(max_requests=2, max_queued_prompt_tokens=1000)
    a, b = adm.admit(10), adm.admit(20)
    with pytest.raises(OverCapacityError, match="2 requests in flight, limit 2"):
        adm.admit(1)
    assert adm.stats() == AdmissionStats(2, 30, 1)
    a.release()
    a.release()
    assert adm.stats() == AdmissionStats(1, 20, 1)
    c = adm.admit(5)
    b.release()
    c.release()
    assert adm.stats() == AdmissionStats(0, 0, 1)


def test_queued_tokens_leave_at_first_token() -> None:
    """Prompt tokens are queued until first_token(); a prompt over the bound is admitted
    only when nothing is queued, never refused forever."""
    adm = Admission(max_requests=10, max_queued_prompt_tokens=100)
    a = adm.admit(80)
    with pytest.raises(OverCapacityError, match="80 prompt tokens queued"):
        adm.admit(30)
    a.first_token()
    a.first_token()
    assert adm.stats() == AdmissionStats(1, 0, 1)
    big = adm.admit(500)  # alone in the queue
    with pytest.raises(OverCapacityError):
        adm.admit(1)
    big.release()
    a.release()
    assert adm.stats() == AdmissionStats(0, 0, 2)
