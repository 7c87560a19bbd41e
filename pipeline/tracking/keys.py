"""MLflow keys and values: flattening nested config into legal, collision-free params.

MLflow's limits (mlflow.utils.validation) are copied as numbers so that flattening
does not need mlflow imported; a test checks them against mlflow.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_DATASET_DIGEST = 36


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}``; lists of mappings are indexed (``sources.0.name``).

    Keys are made legal for MLflow (:func:`sanitize_key`). Two different keys that would
    become the same MLflow key (``"a:b"`` and ``"a_b"``, or two long keys cut at the
    length limit) each get a short hash of their original spelling appended, so no
    value is silently merged into another; ``config.yaml`` keeps the original spelling.
    """
    flat: dict[str, str] = {}
    _flatten(params, prefix, flat)
    by_key: dict[str, list[str]] = {}
    for original in flat:
        by_key.setdefault(sanitize_key(original), []).append(original)
    out: dict[str, str] = {}
    for key, originals in by_key.items():
        if len(originals) == 1:
            out[key] = flat[originals[0]]
            continue
        for original in originals:
            tag = "~" + hashlib.sha256(original.encode()).hexdigest()[:8]
            out[key[: MAX_KEY - len(tag)] + tag] = flat[original]
    return out


def _flatten(params: Mapping[str, Any], prefix: str, flat: dict[str, str]) -> None:
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, f"{name}.", flat)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            _flatten({str(i): v for i, v in enumerate(value)}, f"{name}.", flat)
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = truncate(text, MAX_PARAM_VALUE)


def sanitize_key(key: str) -> str:
    """Make ``key`` a legal MLflow param/metric/tag key (chars, no ``//``, length)."""
    key = re.sub(r"[^/\w.\- ]", "_", str(key))
    key = re.sub(r"/+", "/", key).strip("/") or "_"
    return key[:MAX_KEY]


def truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def str_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as legal MLflow strings; ``mlflow.*`` system tags pass through untouched."""
    return {
        (k if k.startswith("mlflow.") else sanitize_key(k)): truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()
    }


def flat_numbers(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers as ``{"a/b/c": value}`` (MLflow metric keys); bools and text skipped."""
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
