"""Torch's rendezvous store listens on rank 0's address only, not on every interface.

Ray Train starts the torch process group through torch's ``env://`` rendezvous: rank 0
hosts a TCPStore server at ``MASTER_ADDR:MASTER_PORT`` (the address Ray Train picked on
rank 0's node, the one every rank dials), but torch binds that server to all interfaces
and has no option to narrow it. :func:`bind_store_to_master_addr`, run in a Ray worker
process before its process group starts, wraps torch's store factory so that
rank 0 first binds a socket to exactly that address and hands it to the TCPStore
(``master_listen_fd``). Clients, timeouts and multi-tenancy stay torch's own.

Every Ray worker process runs the setup hook, most of them Ray's own actors that never
touch torch (Ray Train's controller, its placement-group cleaner, synchronisation and
preemption actors, a stage's task on a prestarted worker), so the hook does not import
torch: :func:`bind_store_when_imported` wraps the factory the moment torch's rendezvous
module is first imported (1.8 s of every worker's start on a 2-core Xeon otherwise).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import socket
import sys
from datetime import timedelta

log = logging.getLogger(__name__)
_sockets: list[socket.socket] = []  # the bound listeners live as long as the process
RENDEZVOUS_MODULE = "torch.distributed.rendezvous"


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
    rendezvous = importlib.import_module(RENDEZVOUS_MODULE)
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


# Loaders that load one module each (a finder makes one per module it finds).
_FILE_LOADERS = (
    importlib.machinery.SourceFileLoader,
    importlib.machinery.SourcelessFileLoader,
    importlib.machinery.ExtensionFileLoader,
)


class _AfterImport(importlib.abc.MetaPathFinder):
    """An import hook that runs ``then()`` right after module ``name`` has executed, before
    the import statement that loaded it returns (so no importer sees the module unpatched).

    It leaves ``sys.meta_path`` by replacing the list, never by editing it: another
    thread's import may be iterating over the old list. It wraps the module's own loader
    (a file loader: one per module) for that one execution and restores it; if the
    module's execution fails, the hook goes back so that a retried import is patched
    too. A module without a file loader cannot be wrapped this way: that is said (a
    warning), and the module imports unpatched."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def _leave(self) -> None:
        sys.meta_path = [f for f in sys.meta_path if f is not self]

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        self._leave()  # the real finders locate it; this hook fires once
        spec = importlib.util.find_spec(fullname)
        if spec is None:
            return None
        loader = spec.loader
        if not isinstance(loader, _FILE_LOADERS):
            log.warning("%s is loaded by %r, not from a file: %s not applied", fullname, loader, self.then.__name__)
            return spec
        exec_module = loader.exec_module

        def exec_then(module) -> None:
            del loader.exec_module  # the class's own method again
            try:
                exec_module(module)
            except BaseException:
                sys.meta_path = [self, *sys.meta_path]
                raise
            self.then()

        loader.exec_module = exec_then  # type: ignore[method-assign]
        return spec


def bind_store_when_imported() -> None:
    """:func:`bind_store_to_master_addr` now if torch's rendezvous module is loaded, else
    the moment it is first imported (an import hook), so a process that never uses torch
    never imports it."""
    if RENDEZVOUS_MODULE in sys.modules:
        bind_store_to_master_addr()
    elif not any(isinstance(f, _AfterImport) and f.name == RENDEZVOUS_MODULE for f in sys.meta_path):
        sys.meta_path = [_AfterImport(RENDEZVOUS_MODULE, bind_store_to_master_addr), *sys.meta_path]
