"""start_ray: a ray.init whose head node timed out during startup is retried once the
processes it spawned are killed; any other error is raised at once."""

import subprocess
import sys

import pytest

from scission.cluster.launcher import start_ray

_TIMEOUT = ("The current node timed out during startup. This could happen because some of "
            "the raylet failed to startup or the GCS has become overloaded.")


class _FlakyInit:
    """Spawns a long-lived child (a stand-in raylet) each call; the first ``failures`` calls
    then raise ``error``."""

    def __init__(self, failures: int, error: str):
        self.failures, self.error = failures, error
        self.children: list[subprocess.Popen] = []

    def __call__(self) -> None:
        self.children.append(subprocess.Popen([sys.executable, "-c",
                                               "import time; time.sleep(600)"]))
        if len(self.children) <= self.failures:
            raise Exception(self.error)

    def close(self) -> None:
        for c in self.children:
            c.kill()
            c.wait()


@pytest.fixture
def flaky():
    made: list[_FlakyInit] = []

    def make(failures: int, error: str = _TIMEOUT) -> _FlakyInit:
        made.append(_FlakyInit(failures, error))
        return made[-1]

    yield make
    for f in made:
        f.close()


def _alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


def test_a_startup_timeout_is_retried_and_its_processes_killed(flaky):
    init = flaky(failures=2)
    start_ray(init, attempts=3)
    assert len(init.children) == 3
    # The two failed attempts' processes were killed (and reaped by wait_procs); the one
    # that succeeded is left running.
    assert [_alive(c) for c in init.children] == [False, False, True]


def test_processes_from_before_the_call_are_not_touched(flaky):
    older = flaky(failures=0)
    older()
    init = flaky(failures=1)
    start_ray(init, attempts=2)
    assert _alive(older.children[0])
    assert [_alive(c) for c in init.children] == [False, True]


def test_the_last_timeout_is_raised(flaky):
    init = flaky(failures=5)
    with pytest.raises(Exception, match="timed out during startup"):
        start_ray(init, attempts=2)
    assert len(init.children) == 2


def test_another_error_is_raised_at_once(flaky):
    init = flaky(failures=1, error="Permission denied: /tmp/ray")
    with pytest.raises(Exception, match="Permission denied"):
        start_ray(init, attempts=3)
    assert len(init.children) == 1
    assert _alive(init.children[0])  # not a startup timeout: nothing is killed


def test_attempts_below_one_is_refused():
    with pytest.raises(ValueError, match="attempts"):
        start_ray(lambda: None, attempts=0)

