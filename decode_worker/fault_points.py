"""Test-only fault points: hold a worker at a named point so a test can fault a peer there.

A KV pull takes milliseconds, so "the prefill worker dies while the decode worker pulls"
cannot be hit by timing. A fault point makes it deterministic: the test arms the point, the
first pull that reaches it stops there and says so, the test kills whom it wants, then lets
the pull go on. Off (one ``None`` check per pull) unless the environment variable
``SCISSION_TEST_FAULT_DIR`` names a directory when the worker starts; never set it in
production.

Protocol (files in that directory; ``{point}`` e.g. ``decode.pull``):

1. the test creates ``{point}.arm``;
2. the first ``reach(point, detail)`` that finds it claims it (an atomic rename: one caller
   wins, later ones pass straight through), writes ``detail`` as JSON to
   ``{point}.reached`` (atomically: written aside, then renamed), and waits;
3. the test waits for ``{point}.reached``, does its fault, and creates ``{point}.go``;
4. the caller goes on once ``{point}.go`` exists, or after ``max_wait_s`` (a warning).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "SCISSION_TEST_FAULT_DIR"
_POLL_S = 0.02


class FaultPoints:
    """Fault points under ``directory``; ``None`` directory = all off."""

    def __init__(self, directory: str | None, max_wait_s: float = 120.0) -> None:
        self.directory = Path(directory) if directory else None
        self.max_wait_s = max_wait_s
        if self.directory is not None:
            logger.warning("test fault points are ON (%s=%s): never in production", ENV_VAR,
                           directory)

    @classmethod
    def from_env(cls) -> FaultPoints:
        """Read ``SCISSION_TEST_FAULT_DIR`` once (at worker start)."""
        return cls(os.environ.get(ENV_VAR) or None)

    def reach(self, point: str, detail: dict[str, str | int]) -> bool:
        """Stop here if ``point`` is armed (see the module docstring); True if it stopped."""
        if self.directory is None:
            return False
        base = self.directory / point
        claimed = base.with_name(f"{point}.claimed.{os.getpid()}")
        try:
            os.rename(base.with_name(f"{point}.arm"), claimed)
        except FileNotFoundError:  # not armed, or another caller won it
            return False
        aside = base.with_name(f"{point}.reached.tmp")
        aside.write_text(json.dumps({**detail, "pid": os.getpid()}))
        os.replace(aside, base.with_name(f"{point}.reached"))
        logger.warning("fault point %s reached (%s); waiting for %s.go", point, detail, point)
        go, deadline = base.with_name(f"{point}.go"), time.monotonic() + self.max_wait_s
        while not go.exists():
            if time.monotonic() > deadline:
                logger.warning("fault point %s: no go within %.0fs; going on", point,
                               self.max_wait_s)
                break
            time.sleep(_POLL_S)
        return True
