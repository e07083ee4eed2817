"""The output folder of a batch run, local or remote, through one pyarrow filesystem.

Layout under ``--out``::

    batch.json                      the options the folder was made with (a rerun must match them)
    faces/<face id>/mesh.<fmt>      one folder per face (+ coefficients.json, texture files, overlay.png)
    identities/<identity id>/       the identity mesh of a set (manifest ``identity`` column)
    parts/                          the resume log: Parquet part files, each written whole (tmp + rename)
    results.parquet | results.jsonl the one results table, rebuilt from parts/ at the end of every run
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facerecon.batch.inputs import is_uri


@dataclass
class Store:
    """A folder on a pyarrow filesystem; every path argument is relative to it (``/``-separated)."""

    root: str  # what the user gave: a local path or a URI

    def __post_init__(self) -> None:
        from pyarrow import fs as pafs

        if is_uri(self.root):
            self.fs, self.base = pafs.FileSystem.from_uri(self.root)
            self.scheme: str | None = self.root.split("://", 1)[0]
        else:
            local = self.root[len("file://"):] if self.root.startswith("file://") else self.root
            self.fs, self.base, self.scheme = pafs.LocalFileSystem(), str(Path(local).resolve()), None
        self.base = self.base.rstrip("/")

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what ``self.fs`` takes)."""
        return f"{self.base}/{rel}" if rel else self.base

    def uri(self, rel: str = "") -> str:
        """``rel`` as a location other processes can open: an absolute local path or a URI."""
        p = self.path(rel)
        return p if self.scheme is None else f"{self.scheme}://{p}"

    @property
    def is_local(self) -> bool:
        return self.scheme is None

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if parent:
            self.makedirs(parent)
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``rel`` so that a reader never sees it half-written (a temporary name, then a rename)."""
        tmp = f"{rel}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.write_bytes(tmp, data)
        self.fs.move(self.path(tmp), self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        from pyarrow import fs as pafs

        if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(rel)) as f:
            return bytes(f.read())

    def files(self, rel_dir: str, suffix: str) -> list[str]:
        """Files below ``rel_dir`` (recursively) ending in ``suffix``, relative to the root, sorted."""
        from pyarrow import fs as pafs

        top = self.path(rel_dir)
        if self.fs.get_file_info(top).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(top, recursive=True))
        n = len(self.base) + 1
        return sorted(i.path[n:] for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def mtime_ns(self, rel: str) -> int | None:
        info = self.fs.get_file_info(self.path(rel))
        return None if info.mtime_ns is None else int(info.mtime_ns)

    def info(self) -> dict[str, Any]:
        return {"root": self.root, "base": self.base, "scheme": self.scheme}
