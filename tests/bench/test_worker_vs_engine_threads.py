"""bench/worker_vs_engine's per-thread counters: CPU and voluntary context switches read
from /proc, and the busiest threads between two readings."""

import os
import threading
import time

from scission.bench.worker_vs_engine import busiest_threads, thread_counters


def test_busiest_threads_hand_computed():
    before = {1: (10.0, 100), 2: (5.0, 50), 3: (1.0, 7)}
    after = {1: (11.5, 100), 2: (5.5, 290), 3: (1.0, 7), 4: (0.25, 3)}  # 4 started between
    rows = busiest_threads(before, after, wall_s=2.0, steps=60)
    assert rows == [{"tid": 1, "cpu_pct": 75.0, "sleeps_per_step": 0.0},
                    {"tid": 2, "cpu_pct": 25.0, "sleeps_per_step": 4.0}]
    assert busiest_threads(before, after, wall_s=2.0, steps=60, n=4)[-1]["tid"] == 3


def test_thread_counters_see_a_threads_sleeps_and_cpu():
    tid: list[int] = []
    started, go, done, release = (threading.Event() for _ in range(4))

    def work():
        tid.append(threading.get_native_id())
        started.set()
        go.wait()
        for _ in range(50):
            time.sleep(0.001)  # each one a voluntary context switch
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:  # 0.3 s of this thread's own CPU
            pass
        done.set()
        release.wait()  # alive while it is read

    t = threading.Thread(target=work)
    t.start()
    try:
        started.wait()
        before = thread_counters(os.getpid())
        go.set()
        done.wait()
        after = thread_counters(os.getpid())
    finally:
        release.set()
        t.join()
    cpu_s = after[tid[0]][0] - before[tid[0]][0]
    sleeps = after[tid[0]][1] - before[tid[0]][1]
    assert 0.25 <= cpu_s <= 0.6  # clock-tick resolution (10 ms) and the sleeps' own CPU
    assert sleeps >= 50
    top = busiest_threads(before, after, wall_s=1.0, steps=1, n=1)
    assert top[0]["tid"] == tid[0] and top[0]["sleeps_per_step"] == sleeps
