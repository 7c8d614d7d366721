"""Create NIXL agents whose UCX progress thread sleeps instead of spinning.

NIXL's UCX backend runs a progress thread that ``poll()``s the UCX workers' event file
descriptors with a timeout of ``pthrDelay`` (microseconds, rounded up to whole
milliseconds). The Python ``nixl_agent`` hard-codes ``pthrDelay = 0``, so that
``poll()`` returns at once and the thread spins on a whole core for the life of the
agent. Measured with nixl 1.5.1 on the 2-core CI machine: an idle agent burns 100 % of
a core at delay 0, 5.8 % at 1 ms and 0.09 % at 100 ms. On a CPU worker that core is the
one the model runs on: a decode step took ~207 ms in the cluster vs ~56 ms for the engine
alone (bench/README.md, "decode-step profile").

The timeout is only the upper bound of a sleep: UCX signals the event fd when a
message (connection setup, an active-message notification, a tcp fragment) arrives, and
the thread wakes at once. The bulk READ over ``cma`` is done by the reader's own process
(``process_vm_readv``) and needs no progress on the target at all.

``nixl_agent_config`` exposes no such knob, so ``new_nixl_agent`` sets it on the
binding-level config while the agent is constructed (under a lock; the patched attribute
is restored before the call returns).
"""

from __future__ import annotations

import sys
import threading

from nixl._api import nixl_agent, nixl_agent_config

DEFAULT_PROGRESS_TIMEOUT_MS = 100
_PATCH_LOCK = threading.Lock()


def new_nixl_agent(name: str, backend: str, progress_timeout_ms: int) -> nixl_agent:
    """A ``nixl_agent`` with one ``backend`` whose progress thread waits on UCX events.

    Args:
        name: NIXL agent name.
        backend: backend plugin name (``"UCX"``).
        progress_timeout_ms: longest the progress thread sleeps without an event, in
            milliseconds; 0 restores NIXL's busy polling.

    Raises:
        ValueError: ``progress_timeout_ms < 0``.
        Whatever ``nixl_agent`` raises (missing plugin, backend creation failure).
    """
    if progress_timeout_ms < 0:
        raise ValueError(f"progress_timeout_ms must be >= 0, got {progress_timeout_ms}")
    bindings = sys.modules[nixl_agent.__module__].nixlBind
    real_agent = bindings.nixlAgent

    def agent_with_delay(agent_name, agent_config):
        agent_config.pthrDelay = progress_timeout_ms * 1000  # microseconds
        return real_agent(agent_name, agent_config)

    with _PATCH_LOCK:
        bindings.nixlAgent = agent_with_delay
        try:
            return nixl_agent(name, nixl_agent_config(backends=[backend]))
        finally:
            bindings.nixlAgent = real_agent
