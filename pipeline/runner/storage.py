"""Run storage: where Ray Train keeps its runs and where a stage stages its inputs.

``ray.storage_path`` is a URI (``s3://bucket/runs``, ``gs://bucket/runs``,
``file:///mnt/shared/runs``, with pyarrow's query options such as
``?endpoint_override=...``) or a path. With the embedded Ray a relative path lies under
the repository (default ``checkpoints``). On a cluster every node reads and writes the
storage, so it must be a URI or an absolute path on a mount every node shares; a
relative path (a folder on the driver's machine only) is refused. URIs are never
rewritten: every access goes through the pyarrow filesystem of the URI, the one Ray
Train itself uses, so object stores work wherever pyarrow has them.

Staged inputs are content-addressed copies of a stage's input folders (a mixture, a
starting checkpoint): ``<storage>/staged/<key>/<copy>/`` where ``key`` names the content
and ``copy`` is a fresh id per copy made. A copy counts once its ``.complete`` marker
(written last) exists; object stores have no atomic rename of a folder, so a copy is
never moved or replaced, and two drivers staging the same key at once each make their
own copy instead of deleting the other's. Ranks fetch a staged copy into a node-local
cache. Nothing here deletes staged copies: remove ``<storage>/staged`` when no run needs
it (a copy a crash left without its marker is never used).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.configbase import ConfigError

COMPLETE = ".complete"
STAGED = "staged"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: not a drive letter


def cache_dir() -> Path:
    """This user's node-local cache of fetched staged inputs (worker side)."""
    return Path(tempfile.gettempdir()) / f"mobilemoe-staged-{os.getuid()}"


def _private(folder: Path) -> Path:
    """``folder`` created private to this user; refused if someone else owns it (a
    shared /tmp: nobody else may plant the inputs a rank trains on)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user: remove it, or set TMPDIR elsewhere")
    return folder


def is_uri(location: str) -> bool:
    """``s3://...``, ``file:///...``, ``file:/...``: anything with a scheme."""
    return bool(_SCHEME.match(location))


def join_uri(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended to its path, its query (pyarrow's options) kept."""
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


@dataclass(frozen=True)
class RunStorage:
    """A storage root: ``uri`` is what Ray Train gets as ``storage_path``."""

    uri: str

    def _fs(self, *parts: str):
        from pyarrow.fs import FileSystem

        fs, root = FileSystem.from_uri(self.uri)
        return fs, "/".join([root.rstrip("/"), *parts]) if parts else root

    def child(self, *parts: str) -> str:
        return join_uri(self.uri, *parts)

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

    def check_writable(self) -> None:
        """Write and delete a probe object under the root, so a missing bucket or refused
        credentials are found before a job starts, not at its first checkpoint. Raises
        OSError with the filesystem's message (pyarrow names the AWS error code)."""
        fs, root = self._fs()
        probe = f"{root.rstrip('/')}/.probe-{uuid.uuid4().hex}"
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)

    def complete_copy(self, key: str) -> str | None:
        """The URI of a complete staged copy of ``key``, or None."""
        from pyarrow.fs import FileSelector, FileType

        fs, path = self._fs(STAGED, key)
        if fs.get_file_info(path).type != FileType.Directory:
            return None
        for copy in sorted(fs.get_file_info(FileSelector(path)), key=lambda info: info.path):
            if copy.type == FileType.Directory and fs.get_file_info(f"{copy.path}/{COMPLETE}").type == FileType.File:
                return self.child(STAGED, key, copy.base_name)
        return None

    def stage(self, local: Path, key: str) -> str:
        """Copy the folder ``local`` to ``<storage>/staged/<key>/<copy>/`` unless a complete
        copy of ``key`` is there already; return the copy's URI. ``key`` must name the
        content (a hash of it): any complete copy of a key is as good as another."""
        from pyarrow.fs import LocalFileSystem, copy_files

        found = self.complete_copy(key)
        if found:
            return found
        copy = uuid.uuid4().hex
        fs, path = self._fs(STAGED, key, copy)
        fs.create_dir(path, recursive=True)
        try:
            copy_files(str(local.resolve()), path, source_filesystem=LocalFileSystem(), destination_filesystem=fs)
            with fs.open_output_stream(f"{path}/{COMPLETE}") as marker:
                marker.write(b"")
        except BaseException:
            fs.delete_dir(path)  # our own unfinished copy only
            raise
        return self.child(STAGED, key, copy)


# A URI's user part runs to the last "@" before the end of the URI (a secret key may
# hold "/" or "+"); the URI ends at whitespace or a quote, as in pyarrow's messages.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")


def redacted(text: str) -> str:
    """``text`` (a URI, or a message that quotes one, as pyarrow's errors do) with the
    user part of every URI (``s3://KEY:SECRET@bucket/path``: pyarrow takes credentials
    from it) replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


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


def fetch(uri: str, cache: Path | None = None) -> Path:
    """A node-local copy of the staged copy ``uri`` (fetched once per node).

    ``cache``: default :func:`cache_dir` (created private to this user). The copy is made
    in a private folder and renamed into place, so ranks that share a node never read a
    half-fetched copy. Raises FileNotFoundError for a copy that was never completed."""
    from pyarrow.fs import FileSystem, FileType, LocalFileSystem, copy_files

    fs, path = FileSystem.from_uri(uri)
    if fs.get_file_info(f"{path}/{COMPLETE}").type != FileType.File:
        raise FileNotFoundError(f"staged input {uri} is missing or incomplete (no {COMPLETE} marker)")
    key, copy = path.rstrip("/").rsplit("/", 2)[-2:]
    cache = cache or _private(cache_dir())
    target = cache / key / copy
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{copy}.{uuid.uuid4().hex}"
    partial.mkdir()
    try:
        copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=LocalFileSystem())
        os.rename(partial, target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not target.is_dir():  # not another rank of this node getting there first
            raise
    return target
