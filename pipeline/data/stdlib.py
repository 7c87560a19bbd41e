"""Python source code and docstrings, read from the standard library (or any tree).

Files are visited in a fixed hash order rather than alphabetically, so a ``max_docs``
cap samples across the whole library instead of keeping only ``a*`` modules. Every
document of one top-level definition (its code, its docstring, its methods) shares the
split key ``py:<module>.<name>``, so code and docs of one function never straddle the
train/val split.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.configbase import require
from pipeline.data.base import DataError, Document, Kind

# Test suites, GUI toolkits, vendored wheels and codec tables are large and atypical.
DEFAULT_EXCLUDE = [
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "encodings",
    "ensurepip",
    "pydoc_data",
    "__pycache__",
    "lib-dynload",
]
_MAX_FILE_BYTES = 400_000


def source_root(options: dict) -> Path:
    return Path(options["root"] or sysconfig.get_paths()["stdlib"])


def _check(options: dict) -> None:
    root = source_root(options)
    if not root.is_dir():
        raise DataError(f"python source root {root} is not a directory")


@functools.lru_cache(maxsize=8)
def module_files(root: str, exclude: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(module name, path) pairs under ``root``, in a stable pseudo-random order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place: excluded names, and directories that cannot be packages.
        dirnames[:] = sorted(d for d in dirnames if d not in exclude and "-" not in d and "." not in d)
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        for name in filenames:
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            module = (prefix + stem).removesuffix(".__init__")
            found.append((module, os.path.join(dirpath, name)))
    found.sort(key=lambda mp: hashlib.sha1(mp[0].encode()).hexdigest())
    return tuple(found)


@functools.lru_cache(maxsize=2048)
def _parse(path: str) -> tuple[list[str], ast.Module] | None:
    try:
        if os.path.getsize(path) > _MAX_FILE_BYTES:
            return None
        source = Path(path).read_text(encoding="utf-8")
        return source.splitlines(), ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None  # unreadable or not valid for this Python: not worth failing a build


class PyDef:
    """One function, class or method; the text views are computed on first use
    (most consumers look only at a few of them)."""

    def __init__(self, module: str, qualname: str, top: str, kind: str, node: ast.AST, lines: list[str]):
        self.module, self.qualname, self.top, self.kind = module, qualname, top, kind
        self._node, self._lines = node, lines

    @property
    def key(self) -> str:
        return f"py:{self.module}.{self.top}"

    @property
    def public(self) -> bool:
        parts = self.module.split(".") + self.qualname.split(".")
        return not any(p.startswith("_") for p in parts)

    @functools.cached_property
    def docstring(self) -> str | None:
        return ast.get_docstring(self._node, clean=True)

    @functools.cached_property
    def signature(self) -> str:
        return _signature(self._node)

    @functools.cached_property
    def _body(self) -> tuple[int, list[str]]:
        node = self._node
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        return start, self._lines[start : node.end_lineno]

    @functools.cached_property
    def code(self) -> str:
        return _dedent(self._body[1], self._node.col_offset)

    @functools.cached_property
    def code_without_docstring(self) -> str:
        start, body = self._body
        if self.docstring is None:
            return self.code
        first = self._node.body[0]
        drop = range(first.lineno - 1 - start, first.end_lineno - start)
        return _dedent([l for i, l in enumerate(body) if i not in drop], self._node.col_offset)


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        init = next(
            (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "__init__"),
            None,
        )
        if init is None:
            return "()"
        args = ast.unparse(init.args)
        if args == "self":
            return "()"
        return f"({args.removeprefix('self, ')})"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"({ast.unparse(node.args)}){returns}"


def _dedent(lines: list[str], indent: int) -> str:
    # The definition's column is its indent; continuation lines of multi-line strings
    # may be less indented and are kept as they are.
    if not indent:
        return "\n".join(lines)
    return "\n".join(l[indent:] if not l[:indent].strip() else l for l in lines)


def python_definitions(root: Path, exclude: list[str], split_classes_over: int = 4000) -> Iterator[PyDef]:
    """Top-level functions and classes; a class longer than ``split_classes_over``
    characters is yielded as its methods instead (keeping documents bounded)."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for module, path in module_files(str(root), tuple(exclude)):
        parsed = _parse(path)
        if parsed is None:
            continue
        lines, tree = parsed
        for node in tree.body:
            if not isinstance(node, defs):
                continue
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            whole = PyDef(module, node.name, node.name, kind, node, lines)
            if kind == "function" or len(whole.code) <= split_classes_over:
                yield whole
                continue
            for sub in node.body:
                if isinstance(sub, defs[:2]):
                    yield PyDef(module, f"{node.name}.{sub.name}", node.name, "method", sub, lines)


def _code_iter(options: dict, cfg) -> Iterator[Document]:
    root, exclude = source_root(options), options["exclude"]
    if options["granularity"] == "module":
        for module, path in module_files(str(root), tuple(exclude)):
            parsed = _parse(path)
            if parsed is None:
                continue
            text = "\n".join(parsed[0])
            if options["min_chars"] <= len(text) <= options["max_chars"]:
                yield Document(f"# module: {module}\n{text}", cfg.domain, cfg.name, key=f"py:{module}")
        return
    for d in python_definitions(root, exclude, options["max_chars"]):
        if options["min_chars"] <= len(d.code) <= options["max_chars"]:
            yield Document(
                f"# module: {d.module}\n{d.code}",
                cfg.domain,
                cfg.name,
                key=d.key,
                meta={"qualname": f"{d.module}.{d.qualname}"},
            )


def docstring_summary(doc: str) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def _docs_iter(options: dict, cfg) -> Iterator[Document]:
    for d in python_definitions(source_root(options), options["exclude"]):
        if not d.public or not d.docstring or len(d.docstring) < options["min_chars"]:
            continue
        doc = d.docstring[: options["max_chars"]]
        text = f"{d.module}.{d.qualname}{d.signature}\n\n{doc}"
        yield Document(
            text,
            cfg.domain,
            cfg.name,
            key=d.key,
            meta={
                "qualname": f"{d.module}.{d.qualname}",
                "signature": d.signature,
                "summary": docstring_summary(d.docstring),
            },
        )


@dataclass(frozen=True)
class StdlibOptions:
    root: str | None = None  # None: this interpreter's standard library
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    max_chars: int = 4000

    def __post_init__(self) -> None:
        require(self.max_chars > 0, "max_chars", "must be a positive integer")


@dataclass(frozen=True)
class CodeOptions(StdlibOptions):
    min_chars: int = 80
    granularity: str = "definition"

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = self.granularity in ("definition", "module")
        require(ok, "granularity", "must be 'definition' or 'module'")


@dataclass(frozen=True)
class DocsOptions(StdlibOptions):
    max_chars: int = 2000
    min_chars: int = 40


def _origin(options: dict) -> dict[str, str]:
    # The stdlib's files are the interpreter's: the same version, the same sources.
    return {"python": platform.python_version()}


KINDS = [
    Kind(
        "python_code",
        "text",
        "PSF-2.0 (Python standard library source)",
        CodeOptions,
        _code_iter,
        _check,
        _origin,
    ),
    Kind(
        "python_docs",
        "text",
        "PSF-2.0 (Python standard library docstrings)",
        DocsOptions,
        _docs_iter,
        _check,
        _origin,
    ),
]
