"""Pool targets, operator commands and the planner's control and decisions, in etcd.

Keys (``RegistryConfig.prefix`` first; values are typed, versioned msgpack ``Record``\\ s):
    {prefix}/pools/targets                  -> PoolTargets     desired workers per role
    {prefix}/pools/commands/{command_id}    -> WorkerCommand   drain / flip one worker
    {prefix}/planner/control                -> PlannerControl  mode and pause (operator)
    {prefix}/planner/decisions/{seq:012d}   -> PlannerDecision the last decisions, with reasons
    {prefix}/planner/last_tick              -> PlannerDecision the last tick's, "none" included

Writers: the planner and the operator CLI write targets (compare-and-swap on the key's
revision, so neither overwrites a change it has not seen); an operator's write carries a
hold (``hold_until_s``) during which the planner writes no targets. The controller
(``cluster/controller.py``) reconciles targets and executes commands, updating each
command's ``state``. Command ids are assigned here (never chosen by a client).
"""

from __future__ import annotations

import enum
import logging
import time
import typing
import uuid
from dataclasses import dataclass, replace

import etcd3
from etcd3.utils import prefix_range_end

from scission.registry.records import Record
from scission.registry.workers import RegistryConfig, WorkerRole

logger = logging.getLogger(__name__)

MAX_DECISIONS_KEPT = 50


class TargetWriter(enum.Enum):
    INITIAL = "initial"  # `scission up` sizes
    PLANNER = "planner"
    OPERATOR = "operator"


class PlannerMode(enum.Enum):
    OFF = "off"  # no decisions
    ADVISORY = "advisory"  # decides and records decisions, changes nothing
    AUTO = "auto"  # decides and writes targets / flips


class CommandKind(enum.Enum):
    DRAIN = "drain"  # stop placing, finish or migrate running requests, then exit
    FLIP = "flip"  # drain, then serve as ``to_role`` in the same process (no model load)


class CommandState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class PoolTargets(Record):
    """Desired number of workers per role. Value of ``{prefix}/pools/targets``."""

    KIND: typing.ClassVar[str] = "pool_targets"
    prefill: int
    decode: int
    colocated: int = 0
    encode: int = 0
    writer: TargetWriter = TargetWriter.INITIAL
    reason: str = ""
    written_at_s: float = 0.0  # wall clock
    hold_until_s: float = 0.0  # wall clock; an operator's hold: the planner waits until then

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.colocated, self.encode) < 0:
            raise ValueError(f"targets must be >= 0: {self}")

    def get(self, role: WorkerRole) -> int:
        return {WorkerRole.PREFILL: self.prefill, WorkerRole.DECODE: self.decode,
                WorkerRole.COLOCATED: self.colocated, WorkerRole.ENCODE: self.encode}[role]

    def with_role(self, role: WorkerRole, n: int) -> PoolTargets:
        return replace(self, **{role.value: n})

    def as_dict(self) -> dict[WorkerRole, int]:
        """role -> target, roles with a target > 0 only."""
        return {role: self.get(role) for role in WorkerRole if self.get(role) > 0}

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.colocated + self.encode

    def held(self, now_s: float) -> bool:
        return self.hold_until_s > now_s


@dataclass(frozen=True)
class WorkerCommand(Record):
    """One operator or planner command for one worker. ``{prefix}/pools/commands/{id}``."""

    KIND: typing.ClassVar[str] = "worker_command"
    command_id: str
    action: CommandKind  # ("kind" is the record envelope's key)
    worker_id: str
    to_role: WorkerRole = WorkerRole.DECODE  # FLIP only
    writer: TargetWriter = TargetWriter.OPERATOR
    reason: str = ""
    issued_at_s: float = 0.0  # wall clock
    state: CommandState = CommandState.PENDING
    message: str = ""  # progress or the error, set by the controller
    duration_s: float = 0.0  # DONE: how long the drain / flip took

    def __post_init__(self) -> None:
        if not self.command_id or not self.worker_id or "/" in self.worker_id:
            raise ValueError(f"bad command_id {self.command_id!r} or worker_id {self.worker_id!r}")

    @property
    def kind(self) -> CommandKind:
        return self.action

    @property
    def finished(self) -> bool:
        return self.state in (CommandState.DONE, CommandState.FAILED)


@dataclass(frozen=True)
class PlannerControl(Record):
    """Operator switches of the planner. Value of ``{prefix}/planner/control``."""

    KIND: typing.ClassVar[str] = "planner_control"
    mode: PlannerMode = PlannerMode.OFF
    paused: bool = False
    updated_at_s: float = 0.0


@dataclass(frozen=True)
class PlannerDecision(Record):
    """One planner decision (made in any mode, applied in AUTO). ``{prefix}/planner/decisions/``."""

    KIND: typing.ClassVar[str] = "planner_decision"
    at_s: float  # wall clock
    action: str  # "scale_up" | "scale_down" | "flip" | "hold"
    loop: str  # "predictive" | "reactive"
    reason: str
    mode: PlannerMode
    applied: bool
    prefill: int  # targets after the decision
    decode: int
    flip_worker_id: str = ""
    flip_to_role: str = ""


class PoolStore:
    """Reads and writes the records above. Every method makes etcd calls and raises etcd
    errors (``registry.etcd_watch.ETCD_ERRORS``); ``write_targets`` may also return False when
    it lost a compare-and-swap race."""

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client,
                 config: RegistryConfig | None = None) -> None:
        self._client = client
        self._config = config if config is not None else RegistryConfig()
        prefix = self._config.prefix
        self.targets_key = f"{prefix}/pools/targets"
        self.commands_prefix = f"{prefix}/pools/commands/"
        self.control_key = f"{prefix}/planner/control"
        self.decisions_prefix = f"{prefix}/planner/decisions/"
        self.last_tick_key = f"{prefix}/planner/last_tick"

    # -- targets ---------------------------------------------------------------------
    def read_targets(self) -> tuple[PoolTargets | None, int]:
        """(targets, mod_revision); (None, 0) if unset or malformed (logged)."""
        value, meta = self._client.get(self.targets_key)
        if value is None:
            return None, 0
        try:
            return PoolTargets.from_bytes(value), meta.mod_revision
        except ValueError as exc:
            logger.warning("ignoring malformed pool targets: %s", exc)
            return None, meta.mod_revision

    def write_targets(self, targets: PoolTargets, expected_revision: int | None = None) -> bool:
        """Put ``targets``; with ``expected_revision`` (0 = the key must not exist) only if the
        key is still at that revision. Returns False if it changed meanwhile."""
        if expected_revision is None:
            self._client.put(self.targets_key, targets.to_bytes())
            return True
        compare = [self._client.transactions.mod(self.targets_key) == expected_revision]
        ok, _ = self._client.transaction(
            compare=compare, success=[self._client.transactions.put(self.targets_key,
                                                                   targets.to_bytes())],
            failure=[])
        return bool(ok)

    # -- commands --------------------------------------------------------------------
    def submit_command(self, kind: CommandKind, worker_id: str, to_role: WorkerRole | None = None,
                       writer: TargetWriter = TargetWriter.OPERATOR, reason: str = "",
                       targets: PoolTargets | None = None,
                       expected_revision: int | None = None) -> WorkerCommand | None:
        """Record a PENDING command for the controller; returns it (with its assigned id).

        With ``targets`` the command and the new targets are written in one transaction (the
        controller never sees one without the other), only if the targets key is still at
        ``expected_revision`` (when given); None if it changed meanwhile (nothing written).
        """
        command = WorkerCommand(
            command_id=f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}", action=kind,
            worker_id=worker_id, to_role=to_role or WorkerRole.DECODE, writer=writer,
            reason=reason, issued_at_s=time.time())
        if targets is None:
            self.put_command(command)
            return command
        tx = self._client.transactions
        compare = [] if expected_revision is None else \
            [tx.mod(self.targets_key) == expected_revision]
        ok, _ = self._client.transaction(
            compare=compare, failure=[],
            success=[tx.put(self.commands_prefix + command.command_id, command.to_bytes()),
                     tx.put(self.targets_key, targets.to_bytes())])
        return command if ok else None

    def snapshot(self) -> tuple[PoolTargets | None, int, list[WorkerCommand]]:
        """(targets, their mod_revision, commands oldest first), read at one revision (one
        transaction), so a command and the targets written with it are seen together."""
        tx = self._client.transactions
        _, responses = self._client.transaction(
            compare=[], failure=[],
            success=[tx.get(self.targets_key),
                     tx.get(self.commands_prefix, prefix_range_end(self.commands_prefix.encode()))])
        targets_kvs, command_kvs = responses
        targets, revision = None, 0
        for value, meta in targets_kvs:
            revision = meta.mod_revision
            try:
                targets = PoolTargets.from_bytes(value)
            except ValueError as exc:
                logger.warning("ignoring malformed pool targets: %s", exc)
        return targets, revision, self._decode_commands(command_kvs)

    def put_command(self, command: WorkerCommand) -> None:
        self._client.put(self.commands_prefix + command.command_id, command.to_bytes())

    def delete_command(self, command_id: str) -> None:
        self._client.delete(self.commands_prefix + command_id)

    def get_command(self, command_id: str) -> WorkerCommand | None:
        value, _ = self._client.get(self.commands_prefix + command_id)
        return None if value is None else WorkerCommand.from_bytes(value)

    def commands(self) -> list[WorkerCommand]:
        """All commands, oldest first (malformed values skipped)."""
        return self._decode_commands(self._client.get_prefix(self.commands_prefix))

    @staticmethod
    def _decode_commands(kvs) -> list[WorkerCommand]:
        out = []
        for value, _meta in kvs:
            try:
                out.append(WorkerCommand.from_bytes(value))
            except ValueError as exc:
                logger.warning("ignoring malformed worker command: %s", exc)
        return sorted(out, key=lambda c: c.command_id)

    # -- planner control and decisions ---------------------------------------------------
    def read_control(self) -> PlannerControl | None:
        value, _ = self._client.get(self.control_key)
        if value is None:
            return None
        try:
            return PlannerControl.from_bytes(value)
        except ValueError as exc:
            logger.warning("ignoring malformed planner control: %s", exc)
            return None

    def write_control(self, control: PlannerControl) -> None:
        self._client.put(self.control_key, control.to_bytes())

    def append_decision(self, decision: PlannerDecision) -> None:
        """Keep the decision and trim to the newest ``MAX_DECISIONS_KEPT``."""
        self._client.put(f"{self.decisions_prefix}{time.time_ns():020d}", decision.to_bytes())
        keys = sorted(meta.key for _v, meta in self._client.get_prefix(self.decisions_prefix,
                                                                        keys_only=True))
        for key in keys[:-MAX_DECISIONS_KEPT]:
            self._client.delete(key)

    def write_last_tick(self, decision: PlannerDecision) -> None:
        """The last tick's decision (one key, overwritten every tick; "none" included)."""
        self._client.put(self.last_tick_key, decision.to_bytes())

    def read_last_tick(self) -> PlannerDecision | None:
        value, _ = self._client.get(self.last_tick_key)
        if value is None:
            return None
        try:
            return PlannerDecision.from_bytes(value)
        except ValueError as exc:
            logger.warning("ignoring a malformed planner tick: %s", exc)
            return None

    def decisions(self, limit: int = 10) -> list[PlannerDecision]:
        """The newest ``limit`` decisions, oldest first."""
        items = sorted(self._client.get_prefix(self.decisions_prefix),
                       key=lambda kv: kv[1].key)
        out = []
        for value, _meta in items[-limit:]:
            try:
                out.append(PlannerDecision.from_bytes(value))
            except ValueError as exc:
                logger.warning("ignoring malformed planner decision: %s", exc)
        return out
