"""Torch's rendezvous store listens on rank 0's address only, not on every interface.

Ray Train starts the torch process group through torch's ``env://`` rendezvous: rank 0
hosts a TCPStore server at ``MASTER_ADDR:MASTER_PORT`` (the address Ray Train picked on
rank 0's node, the one every rank dials), but torch binds that server to all interfaces
and has no option to narrow it. :func:`bind_store_to_master_addr`, run in every Ray
worker process before the process group starts, wraps torch's store factory so that
rank 0 first binds a socket to exactly that address and hands it to the TCPStore
(``master_listen_fd``). Clients, timeouts and multi-tenancy stay torch's own.
"""

from __future__ import annotations

import importlib
import socket
from datetime import timedelta

_sockets: list[socket.socket] = []  # the bound listeners live as long as the process


def bound_store(hostname: str, port: int, world_size: int, timeout: timedelta, use_libuv: bool = True):
    """Rank 0's TCPStore server listening on ``hostname:port`` only (``port`` 0: any free).

    Returns the store; raises OSError when the address cannot be bound."""
    from torch.distributed import TCPStore

    sock = socket.create_server((hostname, port), family=socket.AF_INET6 if ":" in hostname else socket.AF_INET)
    _sockets.append(sock)
    return TCPStore(
        host_name=hostname,
        port=sock.getsockname()[1],
        world_size=world_size,
        is_master=True,
        timeout=timeout,
        multi_tenant=True,
        use_libuv=use_libuv,
        master_listen_fd=sock.fileno(),
    )


def bind_store_to_master_addr() -> None:
    """Make rank 0's rendezvous store of this process listen on MASTER_ADDR only.

    Wraps ``torch.distributed.rendezvous._create_c10d_store`` (what the ``env://`` and
    ``tcp://`` rendezvous call); raises RuntimeError if torch no longer has it (the pin
    of torch changed: check the new version's store factory)."""
    # By module path: ``from torch.distributed import rendezvous`` is the function.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = getattr(rendezvous, "_create_c10d_store", None)
    if original is None:
        raise RuntimeError("torch.distributed.rendezvous._create_c10d_store is gone: adapt runner/rendezvous.py")
    if getattr(original, "bound_to_master_addr", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank == 0 and not rendezvous._torchelastic_use_agent_store():
            return bound_store(hostname, port, world_size, timeout, use_libuv)
        return original(hostname, port, rank, world_size, timeout, use_libuv)

    create_store.bound_to_master_addr = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_store
