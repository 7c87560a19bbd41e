"""Tracking calls that wait out a busy store and never take training down with them.

Every call to the store goes through :class:`Resilient`: transient failures (a SQLite
database locked by another process, a server restarting, a dropped connection) are
retried with exponential backoff (tenacity) for up to ``retry_seconds``. When that
budget is spent, tracking is *lost* for the rest of this process: later calls are
skipped at once, and every call that was not logged is written, with its payload, to a
journal file on disk so that nothing is lost for good and the stage can say exactly
what is missing from MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_service_error(err: BaseException) -> bool:
    """True for failures of the tracking *service* (store, network), as opposed to a
    bug in the caller (a TypeError, or a model torch.export cannot trace)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, (MlflowException, ConnectionError, TimeoutError, OSError)):
        return True
    module = type(err).__module__
    return module.startswith(("sqlalchemy", "requests", "urllib3", "sqlite3"))


def is_transient(err: BaseException) -> bool:
    """Failures that may pass by waiting: busy database, unreachable or overloaded server."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in (
            "TEMPORARILY_UNAVAILABLE",
            "INTERNAL_ERROR",
            "REQUEST_LIMIT_EXCEEDED",
            "SERVICE_UNDER_MAINTENANCE",
            "DEADLINE_EXCEEDED",
        )
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    # sqlalchemy's OperationalError ("database is locked"), requests'/urllib3's
    # connection errors; other OSErrors (a missing file, no permission) will not pass.
    return type(err).__module__.startswith(("sqlalchemy", "requests", "urllib3", "sqlite3"))


class Resilient:
    """Runs tracking calls with retries; after the budget, goes offline and journals.

    ``journal``: a JSON-lines file that receives one record per call that was not
    logged (``{"what": ..., "payload": ...}``); None keeps them only in memory.
    """

    def __init__(self, retry_seconds: float, journal: Path | None = None) -> None:
        self.retry_seconds = retry_seconds
        self.journal = Path(journal) if journal else None
        self.lost_reason: str | None = None
        self.not_logged: list[str] = []
        self.refused: list[str] = []  # calls the store rejected while it was available

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    def retrying(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` retried on transient failures; the last error is raised."""
        import tenacity

        retryer = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_delay(self.retry_seconds),
            wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=15.0),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retryer(fn, *args, **kwargs)

    def __call__(self, what: str, fn: Callable[..., T], *args: Any, payload: Any = None, **kwargs: Any) -> T | None:
        """Best effort: the result of ``fn``, or None when it could not be logged (recorded).

        A store that stays unavailable for ``retry_seconds`` is *lost*: later calls are
        skipped at once. A call the store refuses for a reason of its own (an invalid
        value, say) is recorded as not logged, and tracking carries on."""
        if self.lost:
            self._record(what, payload)
            return None
        try:
            return self.retrying(fn, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified right below
            if not is_service_error(err):
                raise
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            if is_transient(err):
                self.lost_reason = reason
                where = f"; what is not logged goes to {self.journal}" if self.journal else ""
                log.warning(
                    "tracking lost after %.0f s of retries (%s): continuing without it%s",
                    self.retry_seconds,
                    reason,
                    where,
                )
            else:
                log.warning("tracking refused %s (%s); continuing", what, reason)
                self.refused.append(f"{what} ({reason})")
            self._record(what, payload)
            return None

    def record_failure(self, what: str, err: BaseException) -> None:
        """Record that ``what`` could not be logged because of ``err`` (any error)."""
        self.refused.append(f"{what} ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})")
        self._record(what, None)

    def summary(self) -> str | None:
        """One paragraph saying what was not logged, or None when everything was."""
        if not self.not_logged:
            return None
        counts: dict[str, int] = {}
        for what in self.not_logged:
            counts[what] = counts.get(what, 0) + 1
        items = ", ".join(f"{w} (x{n})" if n > 1 else w for w, n in counts.items())
        where = f"; each call with its values is kept in {self.journal}" if self.journal else ""
        cause = f"tracking was lost ({self.lost_reason})" if self.lost else "tracking refused some calls"
        refused = f"; refused: {'; '.join(self.refused[:5])}" if self.refused else ""
        return f"{cause}; not logged to MLflow: {items}{where}{refused}"

    def _record(self, what: str, payload: Any) -> None:
        self.not_logged.append(what)
        if self.journal is None:
            return
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as f:
                f.write(json.dumps({"time": time.time(), "what": what, "payload": payload}, default=str) + "\n")
        except OSError as err:  # the journal is a courtesy; never fail training over it
            log.warning("cannot write tracking journal %s: %s", self.journal, err)

    def _before_sleep(self, state) -> None:
        err = state.outcome.exception()
        log.warning(
            "tracking call failed (%s: %s); retrying for up to %.0f s",
            type(err).__name__,
            str(err).splitlines()[0][:200] if str(err) else "",
            self.retry_seconds,
        )


def read_journal(path: Path) -> list[dict]:
    """The records of a journal written by :class:`Resilient` (empty if there is none)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
