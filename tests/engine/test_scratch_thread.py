"""in_scratch_thread: a build run off the caller's thread, whose OpenMP team does not outlive
it (so a worker's loop thread keeps the process's only team: engine_loop.in_scratch_thread)."""

import os
import threading
import time

import pytest
import torch

from scission.engine.engine_loop import in_scratch_thread


def _num_threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def _wait_threads(n: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while _num_threads() != n and time.monotonic() < deadline:
        time.sleep(0.01)
    return _num_threads()


def _parallel_op() -> float:
    # Far above at::parallel_for's grain size (32768): runs in an OpenMP parallel region.
    x = torch.ones(1 << 22)
    return float((x * 2.0).sum())


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_returns_the_result_and_runs_on_another_thread():
    caller = threading.get_ident()
    assert in_scratch_thread(lambda: (threading.get_ident() != caller, 7)) == (True, 7)


def test_reraises_on_the_callers_thread():
    def boom():
        raise KeyError("no such weight")

    with pytest.raises(KeyError, match="no such weight"):
        in_scratch_thread(boom)


def test_a_scratch_threads_openmp_team_exits_with_it(two_torch_threads):
    _parallel_op()  # this thread's own team, if any, exists before counting
    base = _num_threads()
    assert in_scratch_thread(_parallel_op) == 2.0 * (1 << 22)
    assert _wait_threads(base) == base

    # The control: the same op on a thread that stays alive keeps its team's thread(s).
    done, release = threading.Event(), threading.Event()

    def stay():
        _parallel_op()
        done.set()
        release.wait()

    t = threading.Thread(target=stay, daemon=True)
    t.start()
    done.wait()
    try:
        assert _num_threads() >= base + 2  # the thread and at least one team thread
    finally:
        release.set()
        t.join()
    assert _wait_threads(base) == base
