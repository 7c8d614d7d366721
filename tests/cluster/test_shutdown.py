"""``scission up`` / ``status`` / ``down`` as an operator runs them, as real processes: the
embedded etcd is supervised (SIGKILLed, it comes back on the same endpoint and data dir and
the registry sees the workers again), and ``down`` drains (new requests UNAVAILABLE, the
stream in flight finishes), then leaves no process and no data dir, and exits 0.

The two tests share one ``scission up`` (a cluster start costs most of their time) and run in
file order: the second one stops it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from proc_helpers import descendants, etcd_data_root, kill_all, wait_dead
from serving_helpers import wait_until

from scission.cluster.client import GenerationResult, connect, generate
from scission.proto.scission.v1 import generation_pb2 as pb

pytestmark = pytest.mark.slow

SCISSION = str(Path(sys.executable).parent / "scission")
STREAM_TOKENS = 240


@dataclass
class Up:
    proc: subprocess.Popen
    env: dict[str, str]
    state: dict
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def cli(self, *argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([SCISSION, *argv], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)


def _etcd_pids(up_pid: int) -> list[int]:
    return [pid for pid, name in descendants(up_pid).items() if name == "etcd"]


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Up:
    tmp = tmp_path_factory.mktemp("up")
    state_file, log = tmp / "cluster.json", tmp / "up.log"
    env = {**os.environ, "SCISSION_STATE_FILE": str(state_file), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([SCISSION, "up", "--port", "0", "--kv-cache-mb", "64",
                                 "--lease-ttl-s", "3", "--threads-per-worker", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    tree: dict[int, str] = {}
    roots = []
    try:
        wait_until(lambda: state_file.exists() or proc.poll() is not None, 300, 0.2)
        assert proc.poll() is None, f"scission up exited:\n{log.read_text()[-4000:]}"
        roots = [etcd_data_root(pid) for pid in _etcd_pids(proc.pid)]
        yield Up(proc, env, json.loads(state_file.read_text()), log)
    finally:
        if proc.poll() is None:
            tree = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_all(tree)
        for root in roots:  # a failed test's leftovers
            shutil.rmtree(root, ignore_errors=True)


def _stream_request(max_tokens: int) -> pb.GenerateRequest:
    sp = pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    msg = pb.ChatMessage(role="user", content="Count from one to one thousand in words.")
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=[msg]), sampling=sp)


def test_killed_etcd_comes_back_on_its_endpoint_and_status_sees_the_workers(up):
    """SIGKILL of the embedded etcd: the ``up`` process restarts it on the same endpoint and
    data dir within seconds; ``scission status`` then lists both workers (their leases and
    registrations survived or were renewed) and the cluster serves."""
    [old] = _etcd_pids(up.proc.pid)
    root = etcd_data_root(old)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: [p for p in _etcd_pids(up.proc.pid) if p != old], 20, 0.1)
    [new] = _etcd_pids(up.proc.pid)
    assert etcd_data_root(new) == root

    def status_lists_both() -> bool:
        res = up.cli("status", "--json", timeout_s=30)
        return res.returncode == 0 and sorted(w["role"] for w in json.loads(res.stdout)) == [
            "decode", "prefill"]

    wait_until(status_lists_both, 30, 0.5)
    res = generate(connect(up.state["router_address"]), _stream_request(4), timeout_s=60)
    assert (res.error, res.output_tokens) == ("", 4), up.output()


def test_down_drains_the_stream_in_flight_then_leaves_nothing(up):
    """``scission down --grace-s 30`` while a stream runs: new requests get UNAVAILABLE
    ("shutting down"), the stream completes with all its tokens, ``down`` exits 0 saying the
    cluster stopped, ``up`` exits 0, and no process of the cluster (Ray, workers, router,
    etcd) and neither the etcd data dir nor the state file is left."""
    tree = descendants(up.proc.pid)
    [etcd] = [pid for pid, name in tree.items() if name == "etcd"]
    root = etcd_data_root(etcd)
    stub = connect(up.state["router_address"])
    first_token = threading.Event()
    result: list[GenerationResult] = []
    streamer = threading.Thread(target=lambda: result.append(generate(
        stub, _stream_request(STREAM_TOKENS), 120, on_text=lambda _: first_token.set())))
    streamer.start()
    assert first_token.wait(60), up.output()
    down = subprocess.Popen([SCISSION, "down", "--grace-s", "30"], env=up.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    refusals = []
    while streamer.is_alive() and not refusals:
        probe = generate(stub, _stream_request(1), timeout_s=30)
        if probe.error:
            refusals.append(probe.error)
    streamer.join(60)
    out, err = down.communicate(timeout=120)
    assert result and result[0].error == "", (result, up.output())
    assert result[0].output_tokens == STREAM_TOKENS
    assert refusals and refusals[0].startswith("UNAVAILABLE:") and "shutting down" in \
        refusals[0], refusals
    assert down.returncode == 0, (out, err, up.output())
    assert "cluster stopped" in out
    assert up.proc.wait(30) == 0, up.output()
    assert wait_dead(tree, 10) == [], {p: tree[p] for p in wait_dead(tree, 0)}
    assert not root.exists()
    assert not Path(up.env["SCISSION_STATE_FILE"]).exists()
