"""KV cache transfer between workers over NIXL (one-sided READ, DRAM, UCX backend).

- ``handle``: typed, versioned msgpack messages (``TransferHandle``, ``KVLayoutDescriptor``,
  ``KVNotification``; ``KV_TRANSFER_VERSION``).
- ``agent``: ``KVTransferAgent`` (registration, peers, ``read_blocks``, notifications).
- ``descriptors``: KV cache tensors → layout, registration regions, block-run descriptors.
- ``ucx``: ``configure_ucx_env()`` UCX defaults for host-memory transfer.

Submodules are imported explicitly (``from scission.kv_transfer.agent import ...``) so that
importing the message types never loads NIXL.
"""

from __future__ import annotations
