"""Run storage: where Ray Train keeps its runs and where a stage stages its inputs.

``ray.storage_path`` is a URI (``s3://bucket/runs``, ``gs://bucket/runs``,
``file:///mnt/shared/runs``) or a path. With the embedded Ray a relative path lies under
the repository (default ``checkpoints``). On a cluster every node reads and writes the
storage, so it must be a URI or an absolute path on a mount every node shares; a
relative path (a folder on the driver's machine only) is refused. URIs are never
rewritten: every access goes through the pyarrow filesystem of the URI, the one Ray
Train itself uses, so object stores work wherever pyarrow has them.

Staged inputs (``<storage>/staged/<kind>-<sha256>/``) are content-addressed copies of a
stage's input directories (a mixture, a starting checkpoint) that ranks on other nodes
fetch into a node-local cache. A copy counts only once its ``.complete`` marker exists
(object stores have no atomic rename of a folder); a partial one is replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.configbase import ConfigError

COMPLETE = ".complete"
STAGED = "staged"
# Node-local cache of fetched staged inputs (worker side).
CACHE_DIR = Path(tempfile.gettempdir()) / "mobilemoe-staged"


def is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class RunStorage:
    """A storage root: ``uri`` is what Ray Train gets as ``storage_path``."""

    uri: str

    def _fs(self, *parts: str):
        from pyarrow.fs import FileSystem

        fs, root = FileSystem.from_uri(self.uri)
        return fs, "/".join([root.rstrip("/"), *parts]) if parts else root

    def child(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        from pyarrow.fs import FileType

        fs, path = self._fs(*parts)
        return fs.get_file_info(path).type != FileType.NotFound

    def delete(self, *parts: str) -> None:
        """Remove a folder (a finished run); a missing one is fine."""
        from pyarrow.fs import FileType

        fs, path = self._fs(*parts)
        if fs.get_file_info(path).type == FileType.Directory:
            fs.delete_dir(path)

    def stage(self, local: Path, key: str) -> str:
        """Copy the folder ``local`` to ``<storage>/staged/<key>`` unless a complete copy
        is there already; return its URI. ``key`` must name the content (a hash)."""
        from pyarrow.fs import FileType, LocalFileSystem, copy_files

        if self.exists(STAGED, key, COMPLETE):
            return self.child(STAGED, key)
        fs, path = self._fs(STAGED, key)
        if fs.get_file_info(path).type != FileType.NotFound:
            fs.delete_dir(path)  # a copy interrupted before its marker
        fs.create_dir(path, recursive=True)
        copy_files(str(local.resolve()), path, source_filesystem=LocalFileSystem(), destination_filesystem=fs)
        with fs.open_output_stream(f"{path}/{COMPLETE}") as marker:
            marker.write(b"")
        return self.child(STAGED, key)


def run_storage(location: str, on_cluster: bool, repo_root: Path) -> RunStorage:
    """The storage named by ``ray.storage_path`` = ``location``.

    Raises ConfigError (naming ``ray.storage_path``) for a relative path on a cluster."""
    if is_uri(location):
        return RunStorage(location)
    path = Path(location).expanduser()
    if path.is_absolute():
        return RunStorage(str(path))
    if on_cluster:
        raise ConfigError(
            f"ray.storage_path: {location!r} is a relative path, i.e. a folder on this machine only; on a "
            f"cluster every node writes checkpoints there and reads staged inputs from it: give a URI "
            f"(s3://bucket/runs, gs://bucket/runs) or an absolute path on a mount every node shares"
        )
    return RunStorage(str((repo_root / path).resolve()))


def fetch(uri: str, cache: Path = CACHE_DIR) -> Path:
    """A node-local copy of the staged folder ``uri`` (fetched once per node and key).

    The copy is made in a private folder and renamed into place, so ranks that share a
    node never read a half-fetched copy. Raises FileNotFoundError for a copy that was
    never completed."""
    from pyarrow.fs import FileSystem, FileType, LocalFileSystem, copy_files

    fs, path = FileSystem.from_uri(uri)
    if fs.get_file_info(f"{path}/{COMPLETE}").type != FileType.File:
        raise FileNotFoundError(f"staged input {uri} is missing or incomplete (no {COMPLETE} marker)")
    target = cache / path.rstrip("/").rsplit("/", 1)[-1]
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{target.name}.{uuid.uuid4().hex}"
    partial.mkdir()
    copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=LocalFileSystem())
    try:
        os.rename(partial, target)
    except OSError:  # another rank of this node got there first: same content
        shutil.rmtree(partial, ignore_errors=True)
    return target
