"""Handlers of ``scission pools ...`` (parsing lives in ``cli.py``).

Everything goes through etcd: ``PoolStore`` (targets, commands, planner control and
decisions), ``WorkerDirectory`` (workers and their stats) and the routers' SLO windows. The
controller acts on what is written here; nothing talks to a worker or to Ray.

Targets are written with compare-and-swap on the key's revision (re-read and re-applied on a
lost race), as ``TargetWriter.OPERATOR`` with a hold (``hold_until_s``) during which the
planner writes no targets. A drain or flip writes its ``WorkerCommand`` and the targets moved
by that worker (drain: its role -1; flip: -1 / +1) in one transaction, so the controller
neither starts a replacement for the drained worker nor picks another one for the lower target.

Exit codes: 0 done, 1 a command FAILED / etcd error / lost races, 2 refused input (nothing
changed).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import etcd3

from scission.cluster import pools_view
from scission.cluster.planner.perf_model import DEFAULT_MODEL
from scission.cluster.pools_predict import predict, prediction_text
from scission.cluster.pools_targets import (
    DECODE_CAPABLE,
    PREFILL_CAPABLE,
    Change,
    TargetsConflict,
    TargetsRefused,
    check_targets,
    hold_text,
    operator_targets,
    running_counts,
    targets_text,
    update_targets,
)
from scission.cluster.state import ClusterState, etcd_client_config
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error
from scission.registry.metrics import SCOPE_CLUSTER
from scission.registry.pools import (
    CommandKind,
    CommandState,
    PoolStore,
    PoolTargets,
    TargetWriter,
    WorkerCommand,
)
from scission.registry.workers import (
    DEFAULT_PREFIX,
    RegistryConfig,
    WorkerInfo,
    WorkerRole,
    connect,
)

logger = logging.getLogger(__name__)

WAIT_POLL_S = 0.2
CLEAR_SCREEN = "\033[H\033[2J"
FLIPPABLE = (WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.COLOCATED)


class CliError(Exception):
    """A one-line error for stderr and the exit code (2 = refused input, nothing changed)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def handler(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map CliError and etcd errors onto a one-line message and an exit code."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (CliError, TargetsRefused, TargetsConflict) as exc:
            print(f"scission: error: {exc}", file=sys.stderr)
            if isinstance(exc, CliError):
                return exc.code
            return 1 if isinstance(exc, TargetsConflict) else 2
        except ETCD_ERRORS as exc:
            endpoints = ",".join(_endpoints(args, ClusterState.read()))
            print(f"scission: error: etcd at {endpoints}: {describe_etcd_error(exc)}",
                  file=sys.stderr)
            return 1
    return run


# -- connection -------------------------------------------------------------------------------
@dataclass
class Conn:
    client: etcd3.MultiEndpointEtcd3Client
    registry: RegistryConfig
    store: PoolStore
    max_workers: int | None  # the cluster's worker budget; None = unknown

    def directory(self) -> WorkerDirectory:
        """The worker directory; ``with`` starts it (one range read, then a watch)."""
        return WorkerDirectory(self.client, self.registry)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.close()


def _endpoints(args: argparse.Namespace, state: ClusterState | None) -> list[str]:
    flag = [e for e in args.etcd_endpoints.split(",") if e]
    return flag or (state.etcd_endpoints if state else [])


def open_conn(args: argparse.Namespace) -> Conn:
    """etcd endpoints and prefix from the flags, else from the state file of ``scission up``.
    The worker budget comes from that state file when it describes the same cluster."""
    state = ClusterState.read()
    endpoints = _endpoints(args, state)
    if not endpoints:
        raise CliError("no etcd endpoint: pass --etcd-endpoints or start one with `scission up`")
    prefix = args.prefix or (state.registry_prefix if state else DEFAULT_PREFIX)
    same = state is not None and state.etcd_endpoints == endpoints \
        and state.registry_prefix.rstrip("/") == prefix.rstrip("/")
    try:
        registry = RegistryConfig(prefix=prefix)
        client = connect(etcd_client_config(args, endpoints, state))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return Conn(client, registry, PoolStore(client, registry),
                state.max_workers if same and state else None)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False))


def _finite(obj: dict) -> dict:
    """inf / nan (an overloaded prediction) as None: JSON has no infinity."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in obj.items()}


# -- pools (read) -----------------------------------------------------------------------------
@handler
def show(args: argparse.Namespace) -> int:
    with open_conn(args) as conn, conn.directory() as directory:
        if args.watch is None:
            _show_once(conn, directory, args.json)
            return 0
        try:
            while True:
                if not args.json:
                    print(f"{CLEAR_SCREEN}every {args.watch:g} s: scission pools   "
                          f"{time.strftime('%H:%M:%S')}\n")
                try:
                    _show_once(conn, directory, args.json)
                except ETCD_ERRORS as exc:  # keep watching through an etcd outage
                    print(f"etcd unreachable: {describe_etcd_error(exc)} (retrying)")
                sys.stdout.flush()
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _show_once(conn: Conn, directory: WorkerDirectory, as_json: bool) -> None:
    snap = pools_view.take_snapshot(conn.client, conn.store, conn.registry.prefix, directory)
    if as_json:
        print(json.dumps(pools_view.snapshot_dict(snap), allow_nan=False))
    else:
        print(pools_view.render(snap))


def _parse_role(value: str) -> WorkerRole:
    try:
        return WorkerRole(value)
    except ValueError:
        raise CliError(f"unknown role {value!r} (one of "
                       f"{', '.join(r.value for r in WorkerRole)})") from None


def _check_hold(hold_s: float) -> None:
    if hold_s < 0 or not math.isfinite(hold_s):
        raise CliError(f"--hold must be >= 0 seconds, got {hold_s}")


# -- pools scale ------------------------------------------------------------------------------
@handler
def scale(args: argparse.Namespace) -> int:
    role = _parse_role(args.role)
    if args.count < 0:
        raise CliError(f"worker count must be >= 0, got {args.count}")
    _check_hold(args.hold)
    with open_conn(args) as conn, conn.directory() as directory:
        running = running_counts(directory)
        max_workers = args.max_workers if args.max_workers is not None else conn.max_workers

        def change(current: PoolTargets | None) -> PoolTargets:
            return operator_targets(current, running, {}, {role: args.count},
                                    f"operator: scale {role.value} {args.count}", args.hold)

        if args.dry_run:
            return _scale_dry_run(conn, change, max_workers, args.json)
        before, after = update_targets(conn.store, change, max_workers)
    if args.json:
        print_json({"dry_run": False, "before": pools_view.targets_dict(before, time.time()),
                     "targets": pools_view.targets_dict(after, time.time())})
    else:
        print(f"scaled {role.value}: {before.get(role) if before else running[role]} -> "
              f"{args.count}  (targets {targets_text(after)}; {hold_text(after)})")
    return 0


def _scale_dry_run(conn: Conn, change: Change, max_workers: int | None, as_json: bool) -> int:
    current, _ = conn.store.read_targets()
    new = change(current)
    check_targets(current, new, max_workers)
    before, after = _predictions(conn, current, new)
    if as_json:
        print_json({"dry_run": True, "before": pools_view.targets_dict(current, time.time()),
                     "targets": pools_view.targets_dict(new, time.time()),
                     **_predictions_dict(before, after)})
        return 0
    print(f"dry run: nothing written\n  current targets: {targets_text(current)}\n"
          f"  new targets:     {targets_text(new)}")
    _print_predictions(before, after, new)
    return 0


def _predictions(conn: Conn, current: PoolTargets | None, new: PoolTargets):
    """Predicted TTFT/TPOT for the current and the new targets under the cluster window's
    load (performance model ``DEFAULT_MODEL``); (None, None) without a window or for
    colocated pools."""
    slo = pools_view.read_slo(conn.client, conn.registry.prefix).get(SCOPE_CLUSTER)
    if slo is None or new.colocated:
        return None, None
    base = current if current is not None else replace(new, writer=TargetWriter.INITIAL)
    before, after = (predict(DEFAULT_MODEL, t.prefill, t.decode, slo.arrival_rps,
                             slo.mean_prompt_tokens, slo.mean_output_tokens,
                             slo.slo_ttft_ms, slo.slo_tpot_ms) for t in (base, new))
    return before, after


def _predictions_dict(before, after) -> dict:
    return {"predicted_before": _finite(asdict(before)) if before else None,
            "predicted": _finite(asdict(after)) if after else None}


def _print_predictions(before, after, new: PoolTargets) -> None:
    if before is None or after is None:
        print("  no prediction: " + ("colocated pools" if new.colocated else
                                     "no SLO window published by a router yet"))
        return
    print(f"  load (cluster window): {after.arrival_rps:.2f} req/s, "
          f"{after.mean_prompt_tokens:.0f} prompt / {after.mean_output_tokens:.0f} output tokens")
    for name, p in (("now", before), ("after", after)):
        print(f"  {name:>5}: {prediction_text(p)}")


# -- pools drain / flip -------------------------------------------------------------------------
def _find_worker(conn: Conn, directory: WorkerDirectory, worker_id: str) -> WorkerInfo:
    info = directory.get(worker_id)
    if info is None:
        known = ", ".join(w.worker_id for w in directory.workers()) or "none registered"
        raise CliError(f"no worker {worker_id!r} (workers: {known})")
    if info.draining:
        raise CliError(f"worker {worker_id} is already draining")
    for command in conn.store.commands():
        if command.worker_id == worker_id and not command.finished:
            raise CliError(f"worker {worker_id} already has a {command.state.value} "
                           f"{command.kind.value} command ({command.command_id})")
    return info


@handler
def drain(args: argparse.Namespace) -> int:
    _check_hold(args.hold)
    with open_conn(args) as conn, conn.directory() as directory:
        info = _find_worker(conn, directory, args.worker)
        reason = f"operator: drain {info.worker_id}"
        return _submit(conn, args, directory, info, CommandKind.DRAIN, None,
                       {info.role: -1}, reason)


@handler
def flip(args: argparse.Namespace) -> int:
    _check_hold(args.hold)
    to_role = _parse_role(args.to)
    with open_conn(args) as conn, conn.directory() as directory:
        info = _find_worker(conn, directory, args.worker)
        if info.role is to_role:
            raise CliError(f"worker {info.worker_id} is already {to_role.value}")
        if info.role not in FLIPPABLE or to_role not in FLIPPABLE:
            raise CliError(f"only prefill, decode and colocated workers flip "
                           f"({info.worker_id} is {info.role.value}, --to {to_role.value})")
        roles = [to_role if w.worker_id == info.worker_id else w.role
                 for w in directory.workers() if not w.draining]
        for capable, what in ((PREFILL_CAPABLE, "prefill"), (DECODE_CAPABLE, "decode")):
            if not any(role in capable for role in roles):
                raise CliError(f"refused: flipping {info.worker_id} to {to_role.value} leaves "
                               f"no running {what}-capable worker")
        reason = f"operator: flip {info.worker_id} to {to_role.value}"
        return _submit(conn, args, directory, info, CommandKind.FLIP, to_role,
                       {info.role: -1, to_role: +1}, reason)


def _submit(conn: Conn, args: argparse.Namespace, directory: WorkerDirectory, info: WorkerInfo,
            kind: CommandKind, to_role: WorkerRole | None, deltas: dict[WorkerRole, int],
            reason: str) -> int:
    """Unless --dry-run, write the command with the moved targets (one transaction, retried
    on a lost race) and, with --wait, follow the command to its end."""
    running = running_counts(directory)
    verb = f"{kind.value} {info.worker_id}" + (f" to {to_role.value}" if to_role else "")
    submitted: list[WorkerCommand] = []

    def change(current: PoolTargets | None) -> PoolTargets:
        return operator_targets(current, running, deltas, {}, reason, args.hold)

    def write(new: PoolTargets, revision: int) -> bool:
        command = conn.store.submit_command(kind, info.worker_id, to_role, reason=reason,
                                            targets=new, expected_revision=revision)
        submitted.extend([command] if command is not None else [])
        return command is not None

    if args.dry_run:
        current, _ = conn.store.read_targets()
        planned = change(current)
        check_targets(current, planned, conn.max_workers)
        predicted = _predictions(conn, current, planned)
        _print_submitted(args, verb, None, current, planned, dry_run=True, predicted=predicted)
        if not args.json:
            _print_predictions(*predicted, planned)
        return 0
    before, after = update_targets(conn.store, change, conn.max_workers, write)
    (command,) = submitted
    if not args.wait:
        return _print_submitted(args, verb, command, before, after, dry_run=False)
    if not args.json:
        _print_submitted(args, verb, command, before, after, dry_run=False)
        sys.stdout.flush()  # the command id before the progress lines on stderr
    done = wait_for(conn.store, command.command_id, args.timeout_s, verb)
    if args.json:
        _print_submitted(args, verb, done, before, after, dry_run=False)
    elif done.state is CommandState.DONE:
        print(f"{verb}: done in {done.duration_s:.1f} s")
    return 0 if done.state is CommandState.DONE else 1


def _print_submitted(args: argparse.Namespace, verb: str, command: WorkerCommand | None,
                     before: PoolTargets | None, after: PoolTargets, dry_run: bool,
                     predicted: tuple | None = None) -> int:
    if args.json:
        now_s = time.time()
        print_json({"dry_run": dry_run,
                     "command": pools_view.record_dict(command) if command else None,
                     "before": pools_view.targets_dict(before, now_s),
                     "targets": pools_view.targets_dict(after, now_s),
                     **(_predictions_dict(*predicted) if predicted else {})})
    elif dry_run:
        print(f"dry run: nothing written\n  would submit: {verb}\n"
              f"  targets: {targets_text(before)} -> {targets_text(after)}")
    else:
        assert command is not None, "a submitted command"
        print(f"{verb}: command {command.command_id} submitted\n"
              f"  targets: {targets_text(before)} -> {targets_text(after)} "
              f"({hold_text(after)})")
    return 0


def wait_for(store: PoolStore, command_id: str, timeout_s: float, verb: str) -> WorkerCommand:
    """Poll the command until DONE or FAILED, its progress on stderr. CliError(1) after
    ``timeout_s`` (0 = no limit) or if the command vanished."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
    last: tuple | None = None
    while True:
        command = store.get_command(command_id)
        if command is None:
            raise CliError(f"command {command_id} vanished from etcd", code=1)
        if (command.state, command.message) != last:
            last = (command.state, command.message)
            detail = f": {command.message}" if command.message else ""
            print(f"{verb}: {command.state.value}{detail}", file=sys.stderr, flush=True)
        if command.finished:
            return command
        if time.monotonic() > deadline:
            raise CliError(f"{verb}: still {command.state.value} after {timeout_s:g} s "
                           f"(command {command_id} continues)", code=1)
        time.sleep(WAIT_POLL_S)
