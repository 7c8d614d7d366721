"""The operator CLI of the elastic pools (``scission pools|planner``) against a real etcd:
what each command writes (targets, commands, planner control), what it refuses, and what
``pools --json`` reads back from worker, stats and SLO records written by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from pools_cli_helpers import RacingStore, fake_controller, make_info, make_window

from scission.cluster.cli import build_parser, main
from scission.cluster.commands import cluster_config
from scission.cluster.planner.perf_model import DEFAULT_MODEL
from scission.cluster.pools_predict import predict
from scission.cluster.pools_targets import (
    CAS_ATTEMPTS,
    TargetsConflict,
    operator_targets,
    update_targets,
)
from scission.registry.metrics import slo_key
from scission.registry.pools import (
    CommandKind,
    CommandState,
    PlannerControl,
    PlannerDecision,
    PlannerMode,
    PoolStore,
    PoolTargets,
    TargetWriter,
    WorkerCommand,
)
from scission.registry.workers import (
    RegistryConfig,
    WorkerRegistration,
    WorkerRole,
    WorkerStatsRecord,
)

P, D = WorkerRole.PREFILL, WorkerRole.DECODE


@pytest.fixture
def store(etcd_client, etcd_prefix) -> PoolStore:
    return PoolStore(etcd_client, RegistryConfig(prefix=etcd_prefix))


@pytest.fixture
def register(etcd_client, etcd_prefix) -> Iterator[Callable[..., WorkerRegistration]]:
    """register(worker_id, role, num_blocks=100, stats=None, draining=False): a live
    registration (lease, keepalive thread) as a worker makes; all deregistered at teardown."""
    regs: list[WorkerRegistration] = []

    def _register(worker_id: str, role: WorkerRole, num_blocks: int = 100,
                  stats: WorkerStatsRecord | None = None,
                  draining: bool = False) -> WorkerRegistration:
        reg = WorkerRegistration(etcd_client, RegistryConfig(prefix=etcd_prefix))
        regs.append(reg)
        reg.register(make_info(worker_id, role, num_blocks), ttl_s=30)
        if stats is not None:
            reg.update_stats(stats)
        if draining:
            reg.set_draining(True)
        return reg

    yield _register
    for reg in regs:
        reg.deregister()


@pytest.fixture
def cli(etcd_server, etcd_prefix, capsys) -> Callable[..., tuple[int, str, str]]:
    """cli("pools", "scale", ...) -> (exit code, stdout, stderr), against the test's prefix."""
    def _run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([*argv, "--etcd-endpoints", etcd_server.endpoint, "--prefix", etcd_prefix])
        out, err = capsys.readouterr()
        return rc, out, err
    return _run


def two_by_one(store: PoolStore, register) -> None:
    """prefill-0, prefill-1, decode-0 running; targets prefill=2 decode=1 (initial)."""
    for worker_id, role in (("prefill-0", P), ("prefill-1", P), ("decode-0", D)):
        register(worker_id, role)
    assert store.write_targets(PoolTargets(prefill=2, decode=1), expected_revision=0)


# -- scale ------------------------------------------------------------------------------------
def test_scale_writes_operator_targets_with_hold(cli, store, register):
    """scale sets exactly the role's target, as the operator, held --hold seconds."""
    two_by_one(store, register)
    t0 = time.time()
    rc, out, _ = cli("pools", "scale", "decode", "3", "--hold", "120", "--json")
    t1 = time.time()
    targets, _ = store.read_targets()
    assert rc == 0
    assert (targets.prefill, targets.decode, targets.colocated, targets.encode) == (2, 3, 0, 0)
    assert targets.writer is TargetWriter.OPERATOR
    assert targets.reason == "operator: scale decode 3"
    assert t0 <= targets.written_at_s <= t1
    assert targets.hold_until_s == targets.written_at_s + 120
    shown = json.loads(out)
    assert (shown["before"]["decode"], shown["targets"]["decode"]) == (1, 3)
    assert shown["targets"]["held"] is True and shown["targets"]["writer"] == "operator"

    rc, out, _ = cli("pools", "scale", "prefill", "1", "--hold", "0")
    targets, _ = store.read_targets()
    assert rc == 0 and (targets.prefill, targets.decode, targets.hold_until_s) == (1, 3, 0.0)
    assert out.startswith("scaled prefill: 2 -> 1  (targets prefill=1 decode=3; no hold")


@pytest.mark.parametrize("argv, message", [
    (["decode", "-1"], "worker count must be >= 0, got -1"),
    (["gpu", "2"], "unknown role 'gpu' (one of prefill, decode, colocated, encode)"),
    (["prefill", "0"], "refused: targets decode=1 leave no prefill-capable worker"),
    (["decode", "0"], "refused: targets prefill=2 leave no decode-capable worker"),
    (["prefill", "4", "--max-workers", "4"],
     "refused: 5 workers in total is above the cluster's max workers (4)"),
    (["prefill", "3", "--hold", "-1"], "--hold must be >= 0 seconds, got -1.0"),
])
def test_scale_refuses_invalid_input(cli, store, register, argv, message):
    """Invalid input exits 2 with a one-line error and leaves the targets untouched."""
    two_by_one(store, register)
    before = store.read_targets()
    rc, out, err = cli("pools", "scale", *argv)
    assert (rc, out) == (2, "")
    assert err.startswith(f"scission: error: {message}") and err.count("\n") == 1
    assert store.read_targets() == before


def test_scale_dry_run_predicts_and_writes_nothing(cli, store, register, etcd_client,
                                                   etcd_prefix):
    """--dry-run shows current vs new targets and the model's TTFT/TPOT at the measured load
    (the cluster SloWindow), and leaves the targets as they were."""
    two_by_one(store, register)
    etcd_client.put(slo_key(etcd_prefix, "router-a", "cluster"), make_window("cluster").to_bytes())
    before = store.read_targets()
    rc, out, _ = cli("pools", "scale", "prefill", "1", "--dry-run", "--json")
    assert rc == 0 and store.read_targets() == before
    shown = json.loads(out)
    assert shown["dry_run"] is True
    assert (shown["before"]["prefill"], shown["targets"]["prefill"]) == (2, 1)
    expected = predict(DEFAULT_MODEL, 1, 1, 2.0, 400.0, 100.0, 2000.0, 150.0)
    assert shown["predicted"]["ttft_p90_ms"] == pytest.approx(expected.ttft_p90_ms)
    assert shown["predicted"]["tpot_ms"] == pytest.approx(expected.tpot_ms)
    rc, out, _ = cli("pools", "scale", "prefill", "1", "--dry-run")
    assert rc == 0 and "current targets: prefill=2 decode=1" in out
    assert "new targets:     prefill=1 decode=1" in out and "TTFT p90" in out


def test_flip_dry_run_predicts_and_writes_nothing(cli, store, register, etcd_client,
                                                  etcd_prefix):
    """flip --dry-run submits no command, moves no target, and predicts TTFT/TPOT for the
    targets the flip would leave (prefill=1 decode=2) at the measured load."""
    two_by_one(store, register)
    etcd_client.put(slo_key(etcd_prefix, "router-a", "cluster"), make_window("cluster").to_bytes())
    before = store.read_targets()
    rc, out, _ = cli("pools", "flip", "prefill-1", "--to", "decode", "--dry-run", "--json")
    assert rc == 0 and store.read_targets() == before and store.commands() == []
    shown = json.loads(out)
    assert (shown["targets"]["prefill"], shown["targets"]["decode"]) == (1, 2)
    expected = predict(DEFAULT_MODEL, 1, 2, 2.0, 400.0, 100.0, 2000.0, 150.0)
    assert shown["predicted"]["ttft_p90_ms"] == pytest.approx(expected.ttft_p90_ms)
    assert shown["predicted"]["tpot_ms"] == pytest.approx(expected.tpot_ms)
    rc, out, _ = cli("pools", "flip", "prefill-1", "--to", "decode", "--dry-run")
    assert rc == 0 and "would submit: flip prefill-1 to decode" in out and "TTFT p90" in out


def test_prediction_meets_the_slo_exactly_at_the_models_capacity():
    """At the rate the model says one prefill worker sustains, the predicted TTFT p90 is the
    SLO; a decode pool past its Little's-law capacity is reported overloaded (None)."""
    rps = DEFAULT_MODEL.max_prefill_rps_per_worker(400.0, 2000.0)
    at_capacity = predict(DEFAULT_MODEL, 2, 1, 2 * rps, 400.0, 100.0)
    assert at_capacity.ttft_p90_ms == pytest.approx(2000.0)
    assert predict(DEFAULT_MODEL, 1, 1, 1000.0, 400.0, 100.0).tpot_ms is None


def test_lost_cas_race_is_retried_on_what_won(etcd_client, etcd_prefix, store):
    """A write that loses the compare-and-swap re-reads and applies the same change to the
    winner's targets (the rival's decode=4 survives), without overwriting it blindly."""
    store.write_targets(PoolTargets(prefill=1, decode=1))
    rival = PoolTargets(prefill=1, decode=4, writer=TargetWriter.PLANNER)
    racing = RacingStore(etcd_client, RegistryConfig(prefix=etcd_prefix), rival, races=1)
    running = dict.fromkeys(WorkerRole, 0)
    change = lambda cur: operator_targets(cur, running, {}, {P: 3}, "operator: scale", 0)  # noqa: E731
    before, after = update_targets(racing, change, max_workers=None)
    assert racing.num_writes == 2
    assert (before.prefill, before.decode, before.writer) == (1, 4, TargetWriter.PLANNER)
    assert store.read_targets()[0] == after
    assert (after.prefill, after.decode, after.writer) == (3, 4, TargetWriter.OPERATOR)

    always = RacingStore(etcd_client, RegistryConfig(prefix=etcd_prefix), rival, races=99)
    with pytest.raises(TargetsConflict):
        update_targets(always, change, max_workers=None)
    assert always.num_writes == CAS_ATTEMPTS
    assert store.read_targets()[0].prefill == 1  # the rival's: nothing of ours was written


# -- drain / flip -----------------------------------------------------------------------------
def test_drain_submits_command_and_lowers_target(cli, store, register):
    """drain: one PENDING DRAIN command for the worker, its role's target -1, held."""
    two_by_one(store, register)
    rc, out, _ = cli("pools", "drain", "prefill-1", "--hold", "300", "--json")
    assert rc == 0
    (command,) = store.commands()
    assert command == WorkerCommand(
        command_id=command.command_id, action=CommandKind.DRAIN, worker_id="prefill-1",
        to_role=WorkerRole.DECODE, writer=TargetWriter.OPERATOR,
        reason="operator: drain prefill-1", issued_at_s=command.issued_at_s)
    targets, _ = store.read_targets()
    assert (targets.prefill, targets.decode, targets.writer) == (1, 1, TargetWriter.OPERATOR)
    assert targets.reason == "operator: drain prefill-1"
    assert targets.hold_until_s == targets.written_at_s + 300
    assert json.loads(out)["command"]["command_id"] == command.command_id


def test_flip_submits_command_and_moves_target(cli, store, register):
    """flip: one PENDING FLIP command with to_role, targets -1 / +1 (default hold 600 s)."""
    two_by_one(store, register)
    register("decode-1", D)
    rc, out, _ = cli("pools", "flip", "prefill-0", "--to", "decode")
    assert rc == 0
    (command,) = store.commands()
    assert (command.kind, command.worker_id, command.to_role, command.state) == (
        CommandKind.FLIP, "prefill-0", D, CommandState.PENDING)
    assert command.reason == "operator: flip prefill-0 to decode"
    targets, _ = store.read_targets()
    assert (targets.prefill, targets.decode, targets.hold_until_s - targets.written_at_s) == (
        1, 2, 600.0)
    assert out.splitlines()[0] == f"flip prefill-0 to decode: command {command.command_id} " \
                                  "submitted"


@pytest.mark.parametrize("argv, message", [
    (["flip", "decode-0", "--to", "prefill"],
     "refused: flipping decode-0 to prefill leaves no running decode-capable worker"),
    (["flip", "prefill-0", "--to", "prefill"], "worker prefill-0 is already prefill"),
    (["flip", "prefill-0", "--to", "encode"], "only prefill, decode and colocated workers flip"),
    (["drain", "gpu-7"], "no worker 'gpu-7' (workers: decode-0, prefill-0, prefill-1)"),
    (["drain", "decode-0"], "refused: targets prefill=2 leave no decode-capable worker"),
])
def test_drain_and_flip_refuse_invalid_input(cli, store, register, argv, message):
    """A flip that leaves no decode (or prefill) worker, a no-op flip, an unknown worker or a
    drain of the last decode target exit 2 and write nothing."""
    two_by_one(store, register)
    before = store.read_targets()
    rc, out, err = cli("pools", *argv)
    assert (rc, out) == (2, "")
    assert err.startswith(f"scission: error: {message}")
    assert store.commands() == [] and store.read_targets() == before


def test_drain_refuses_a_worker_with_an_open_command(cli, store, register):
    """A second drain of the same worker while the first is open is refused."""
    two_by_one(store, register)
    assert cli("pools", "drain", "prefill-1")[0] == 0
    rc, _, err = cli("pools", "drain", "prefill-1")
    assert rc == 2 and "already has a pending drain command" in err
    assert len(store.commands()) == 1 and store.read_targets()[0].prefill == 1


@pytest.mark.parametrize("final, rc_expected, message", [
    (CommandState.DONE, 0, "drained"),
    (CommandState.FAILED, 1, "worker died while draining"),
])
def test_wait_follows_the_command_to_its_end(cli, store, register, final, rc_expected, message):
    """--wait returns once the controller finishes the command: exit 0 on DONE, 1 on FAILED
    with the controller's message on stderr."""
    two_by_one(store, register)
    controller = fake_controller(store, final, message)
    rc, out, err = cli("pools", "drain", "prefill-1", "--wait", "--timeout-s", "60")
    controller.join()
    assert rc == rc_expected
    assert err.splitlines()[-1] == f"drain prefill-1: {final.value}: {message}"
    if final is CommandState.DONE:
        assert out.splitlines()[-1] == "drain prefill-1: done in 1.5 s"


# -- pools (read) -----------------------------------------------------------------------------
def test_pools_json_shows_exact_values(cli, store, register, etcd_client, etcd_prefix):
    """pools --json: per role the target, running/draining workers, summed queue and KV use,
    the role's SLO window (else the cluster's); the planner's control, its decisions and the
    open commands only."""
    stats = lambda free, waiting, queued: WorkerStatsRecord(  # noqa: E731
        num_free_blocks=free, num_running=1, num_waiting=waiting,
        queued_prefill_tokens=queued, updated_at_s=1700000000.0)
    register("prefill-0", P, 100, stats(60, 2, 300))
    register("prefill-1", P, 100, stats(90, 1, 50))
    register("decode-0", D, 200, stats(150, 0, 0))
    register("decode-1", D, 200, stats(200, 0, 0), draining=True)
    store.write_targets(PoolTargets(prefill=2, decode=1))
    for scope, window in (("cluster", make_window("cluster")),
                          ("prefill", make_window("prefill", ttft_p50_ms=250.0, ttft_p90_ms=700.0,
                                                  attainment=0.9, arrival_rps=1.5))):
        etcd_client.put(slo_key(etcd_prefix, "router-a", scope), window.to_bytes())
    store.write_control(PlannerControl(mode=PlannerMode.ADVISORY, updated_at_s=5.0))
    decision = PlannerDecision(at_s=10.0, action="scale_up", loop="predictive",
                               reason="ttft_p90 2400 > 2000 ms", mode=PlannerMode.ADVISORY,
                               applied=False, prefill=3, decode=1)
    store.append_decision(decision)
    done = store.submit_command(CommandKind.DRAIN, "decode-1")
    store.put_command(replace(done, state=CommandState.DONE))
    pending = store.submit_command(CommandKind.FLIP, "prefill-1", to_role=D)

    rc, out, _ = cli("pools", "--json")
    shown = json.loads(out)
    assert rc == 0
    assert shown["pools"] == [
        {"role": "prefill", "target": 2, "running": 2, "draining": 0,
         "workers": ["prefill-0", "prefill-1"], "draining_workers": [], "num_waiting": 3,
         "queued_prefill_tokens": 350, "kv_used_blocks": 50, "kv_total_blocks": 200,
         "kv_usage_pct": 25.0, "slo_scope": "prefill", "ttft_p50_ms": 250.0,
         "ttft_p90_ms": 700.0, "tpot_p50_ms": 41.0, "tpot_p90_ms": 66.0, "attainment": 0.9,
         "arrival_rps": 1.5},
        {"role": "decode", "target": 1, "running": 1, "draining": 1, "workers": ["decode-0"],
         "draining_workers": ["decode-1"], "num_waiting": 0, "queued_prefill_tokens": 0,
         "kv_used_blocks": 50, "kv_total_blocks": 400, "kv_usage_pct": 12.5,
         "slo_scope": "cluster", "ttft_p50_ms": 310.0, "ttft_p90_ms": 820.0,
         "tpot_p50_ms": 41.0, "tpot_p90_ms": 66.0, "attainment": 0.95, "arrival_rps": 2.0},
    ]
    assert shown["targets"]["prefill"] == 2 and shown["targets"]["writer"] == "initial"
    assert shown["planner"] == {"mode": "advisory", "paused": False, "updated_at_s": 5.0,
                                "decisions": [{
                                    "at_s": 10.0, "action": "scale_up", "loop": "predictive",
                                    "reason": "ttft_p90 2400 > 2000 ms", "mode": "advisory",
                                    "applied": False, "prefill": 3, "decode": 1,
                                    "flip_worker_id": "", "flip_to_role": ""}]}
    assert [c["command_id"] for c in shown["commands"]] == [pending.command_id]
    assert shown["slo"]["cluster"]["num_routers"] == 1

    rc, text, _ = cli("pools")
    assert rc == 0 and text.splitlines()[0] == "targets: prefill=2 decode=1  (by initial)"
    assert text.splitlines()[3].split() == [
        "prefill", "2", "2", "0", "3", "/", "350", "25.0%", "250", "/", "700", "41", "/", "66",
        "90%", "1.50", "prefill"]
    assert "ttft_p90 2400 > 2000 ms" in text and pending.command_id in text


def test_pools_watch_refreshes_until_ctrl_c(etcd_server, etcd_prefix, store, register):
    """pools --watch keeps printing (one JSON object per refresh with --json) and exits 0 on
    Ctrl-C."""
    two_by_one(store, register)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scission.cluster.cli", "pools", "--watch", "0.1", "--json",
         "--etcd-endpoints", etcd_server.endpoint, "--prefix", etcd_prefix],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
        assert first["targets"]["prefill"] == second["targets"]["prefill"] == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.stdout.close()


# -- planner ----------------------------------------------------------------------------------
def test_planner_mode_and_pause_write_the_control_record(cli, store):
    """planner mode auto, then pause, then resume: each rewrites exactly mode / paused."""
    t0 = time.time()
    assert cli("planner", "mode", "auto")[0] == 0
    control = store.read_control()
    assert (control.mode, control.paused) == (PlannerMode.AUTO, False)
    assert cli("planner", "pause")[0] == 0
    control = store.read_control()
    assert control == PlannerControl(mode=PlannerMode.AUTO, paused=True,
                                     updated_at_s=control.updated_at_s)
    assert t0 <= control.updated_at_s <= time.time()
    rc, out, _ = cli("planner", "status", "--json")
    assert rc == 0 and json.loads(out) == {
        "mode": "auto", "paused": True, "updated_at_s": control.updated_at_s, "decisions": [],
        "last_tick": None, "slo_ttft_ms": None, "slo_tpot_ms": None}
    rc, out, _ = cli("planner", "resume")
    assert rc == 0 and out == "planner: mode=auto paused=no\n"
    assert store.read_control().paused is False


# -- scission up ------------------------------------------------------------------------------
def test_up_flags_map_onto_cluster_and_router_config():
    """--planner / SLO / budget / drain / interval flags reach ClusterConfig and the router's
    SLOs; the defaults are off, 2000 / 150 ms, no budget, 60 s, 5 s."""
    parser = build_parser()
    cfg = cluster_config(parser.parse_args([
        "up", "--planner", "advisory", "--slo-ttft-ms", "900", "--slo-tpot-ms", "80",
        "--max-workers", "6", "--drain-deadline-s", "30", "--planner-interval-s", "2"]))
    assert (cfg.planner_mode, cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.max_workers,
            cfg.drain_deadline_s, cfg.planner_interval_s) == (
        PlannerMode.ADVISORY, 900.0, 80.0, 6, 30.0, 2.0)
    assert (cfg.router.slo_ttft_ms, cfg.router.slo_tpot_ms) == (900.0, 80.0)
    cfg = cluster_config(parser.parse_args(["up"]))
    assert (cfg.planner_mode, cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.max_workers,
            cfg.drain_deadline_s, cfg.planner_interval_s) == (
        PlannerMode.OFF, 2000.0, 150.0, None, 60.0, 5.0)
