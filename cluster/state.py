"""The state file ``scission up`` writes so ``down``, ``generate`` and ``status`` find it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE_FILE = Path(os.environ.get("SCISSION_STATE_FILE",
                                         Path.home() / ".scission" / "cluster.json"))


@dataclass(frozen=True)
class ClusterState:
    pid: int
    router_address: str
    etcd_endpoints: list[str]
    registry_prefix: str
    max_workers: int | None = None  # the worker budget (`up --max-workers` or its default)

    def write(self, path: Path = DEFAULT_STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path = DEFAULT_STATE_FILE) -> ClusterState | None:
        """The state of a running cluster, or None (no file, or its process is gone)."""
        try:
            state = cls(**json.loads(path.read_text()))
            os.kill(state.pid, 0)
        except (OSError, ValueError, TypeError):
            return None
        return state
