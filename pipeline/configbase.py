"""One way to validate config dataclasses and to report what is wrong.

Every component config is a dataclass whose ``__post_init__`` calls :func:`require`;
a failed check raises :class:`ConfigError` naming the dotted field, so a bad value is
reported at construction, long before Ray or a training loop starts.

:func:`from_dict` first checks each value against its field's type annotation with
pydantic in strict mode, so ``seed: true`` is not taken for 1 (a bool is an int in
Python), ``batch_size: 8.0`` is not truncated and ``lr: "1e-3"`` (a YAML 1.1 string)
is not a number. The ``__post_init__`` checks then see values of the declared types.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A config value is invalid. The message starts with the offending key."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise ``ConfigError("<field>: <message>")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys by name.

    Nested dataclass fields are built recursively; ``where`` is the dotted prefix used
    in error messages (e.g. ``"model.moe"``).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    hints = _resolved_types(cls)
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        ftype = hints[name]
        target = _dataclass_in(ftype)
        item = _list_item_dataclass(ftype)
        if target is not None and isinstance(value, Mapping):
            kwargs[name] = from_dict(target, value, sub)
        elif item is not None and isinstance(value, (list, tuple)):
            kwargs[name] = [from_dict(item, v, f"{sub}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = check_type(value, ftype, sub)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if where and not str(err).startswith(where):
            raise ConfigError(f"{where}.{err}") from None
        raise
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def check_type(value: Any, ftype: Any, key: str) -> Any:
    """``value`` checked against annotation ``ftype`` (strict: no bool for int, no
    float for int, no string for a number); returns it, with a YAML list turned into
    the tuple a ``tuple[...]`` field declares. Raises ConfigError naming ``key``."""
    from pydantic import ValidationError

    if ftype is Any:
        return value
    if typing.get_origin(ftype) is tuple and isinstance(value, list):
        value = tuple(value)  # YAML has no tuples
    try:
        return _adapter(ftype).validate_python(value)
    except ValidationError as err:
        reason = err.errors()[0]["msg"]
        raise ConfigError(f"{key}: must be {_type_name(ftype)}, got {value!r} ({reason})") from None


@functools.cache
def _adapter(ftype: Any):
    from pydantic import ConfigDict, TypeAdapter

    return TypeAdapter(ftype, config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def _type_name(ftype: Any) -> str:
    if isinstance(ftype, type):
        return ftype.__name__
    return str(ftype).replace("typing.", "").replace("NoneType", "None")


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _list_item_dataclass(ftype: Any) -> type | None:
    """Return D for a ``list[D]`` field whose items are dataclasses, else None."""
    if typing.get_origin(ftype) in (list, tuple):
        args = typing.get_args(ftype)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]  # type: ignore[return-value]
    return None


def _dataclass_in(ftype: Any) -> type | None:
    """Return the dataclass inside ``ftype`` (plain or ``Optional[...]``), else None."""
    if dataclasses.is_dataclass(ftype):
        return ftype  # type: ignore[return-value]
    for arg in typing.get_args(ftype):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None
