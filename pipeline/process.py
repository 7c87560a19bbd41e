"""Who is running: this process's identity, and whether a recorded one is still alive.

A lock holder or an MLflow run records ``host``, ``pid`` and the process's start time;
the start time tells a live owner from an unrelated process that later got the same pid.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    started: float  # process creation time, seconds since the epoch (psutil)
    command: str = ""

    @classmethod
    def current(cls) -> ProcessId:
        import psutil

        return cls(
            socket.gethostname(), os.getpid(), round(psutil.Process().create_time(), 2), " ".join(sys.argv)[:300]
        )

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        """Another process of this host, e.g. the shell that owns a recipe run."""
        import psutil

        proc = psutil.Process(pid)
        return cls(socket.gethostname(), pid, round(proc.create_time(), 2), " ".join(proc.cmdline())[:300])

    def is_alive(self) -> bool | None:
        """True/False for a process on this host; None when it ran on another host."""
        import psutil

        if self.host != socket.gethostname():
            return None
        try:
            return round(psutil.Process(self.pid).create_time(), 2) == self.started
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False

    def to_tags(self, prefix: str = "runner.") -> dict[str, str]:
        return {f"{prefix}{k}": str(v) for k, v in asdict(self).items() if k != "command"}

    @classmethod
    def from_tags(cls, tags: dict, prefix: str = "runner.") -> ProcessId | None:
        try:
            return cls(tags[f"{prefix}host"], int(tags[f"{prefix}pid"]), float(tags[f"{prefix}started"]))
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        cmd = f", command: {self.command}" if self.command else ""
        return f"pid {self.pid} on {self.host}{cmd}"
