"""What a failed stage's MLflow run says about why it failed.

The UI must answer "why did it fail" without the terminal: a stage that raises leaves
in its run the tags ``error.type`` and ``error.message``, the artifact ``error.txt``
(the traceback) and, when the error carries ``details`` (a dict: the numbers of a
failed check, e.g. ExportCheckError), those as ``error_details.json`` and their numbers
as metrics ``failed/<key>/...``. Errors raised inside a Ray task arrive wrapped
(``RayTaskError``): the original is found through ``cause`` and ``__cause__``.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.tracking.keys import MAX_TAG_VALUE, flat_numbers


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__]  # what raised it, not what it interrupted


def root_error(err: BaseException) -> BaseException:
    """The original exception under Ray's wrapping (``RayTaskError.cause``), else ``err``."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def failure_details(err: BaseException) -> Mapping[str, Any] | None:
    """The first ``details`` dict along ``err``'s chain of causes, if any."""
    for e in _chain(err):
        details = getattr(e, "details", None)
        if isinstance(details, Mapping):
            return details
    return None


def failure_record(err: BaseException) -> dict[str, Any]:
    """Tags, metrics, the traceback text and the details of a failure (module doc)."""
    root = root_error(err)
    message = str(root).strip() or type(root).__name__
    details = failure_details(err)
    return {
        "tags": {"error.type": type(root).__name__, "error.message": message[:MAX_TAG_VALUE]},
        "metrics": {f"failed/{k}": v for k, v in flat_numbers(details or {}).items()},
        "traceback": "".join(traceback.format_exception(err)),
        "details": details,
    }
