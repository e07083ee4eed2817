"""Files kept between starts (the decompressed networks, the uncompressed face model, the face descriptor's
weights): written whole or not at all, so that a crash or a second process never leaves half a file to read."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomically"]


def write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``target``'s folder, call ``write`` on a temporary file beside ``target``, make it readable by all
    (``0o644``: a cache filled at image build time by another user) and rename it into place.

    Raises:
        OSError: the folder or the file cannot be written (the temporary file is removed).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
