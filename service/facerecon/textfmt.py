"""Whole-array text formatting for the mesh writers: ``%d`` and ``%.6f`` of every element of an array at once, in
numpy, byte for byte what Python's ``%`` formatting writes, with no per-number Python call (a few milliseconds for
the ~140,000 numbers of an ICT OBJ where one ``%`` over the whole array takes ~50 ms).

How: a table has one row per line and is built of 4-byte words (uint32, so numpy moves a word per element). Digits
come three at a time from a 1000-entry lookup table of one spare byte and ``"ddd"``; positions a number does not
use (zeros before its first digit, the sign of a positive number, the spare bytes) hold a pad byte (0). The table
is flattened to bytes and the pad bytes dropped, which leaves exactly the compact text.

Exactness of ``%.6f``: Python rounds the exact binary value half-to-even; ``rint(|x| 10^6)`` does the same whenever
``|x| 10^6`` is computed exactly, which holds for every float32 value (24 + 20 significant bits fit a float64's 53),
i.e. everything the decoder produces. For float64 inputs a value within an ulp of a rounding tie may differ in its
last digit (the text stays a valid number within 1e-6). Non-finite values and magnitudes of 1e9 or more are refused
(:class:`ValueError`) so the caller can fall back to ``%``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Field", "fixed6", "integer", "lookup", "lookup_table", "rows"]

#: A column block of a table: ``(rows, k)`` uint32 words of ASCII and pad bytes, or a literal shared by all rows.
Field = np.ndarray | bytes

_PAD = b"\0"


def _table(strings: Sequence[str]) -> np.ndarray:
    """Strings of 3 characters after one spare (pad) byte, as little-endian uint32 words."""
    return np.frombuffer(b"".join(b"\0" + s.encode("ascii") for s in strings), "<u4")


#: ``"%03d" % k`` after a spare byte (inner groups); the same with leading zeros as pads (a number's first group),
#: and with the units digit of 0 kept (a number's last group when no higher one has digits).
_ZEROS = _table([f"{k:03d}" for k in range(1000)])
_LEAD = _table([f"{k:3d}".replace(" ", "\0") if k else "\0\0\0" for k in range(1000)])
_ONLY = _table([f"{k:3d}".replace(" ", "\0") for k in range(1000)])


def _word(text: bytes) -> int:
    if len(text) > 4:
        raise ValueError("a word holds at most 4 bytes")
    return int(np.frombuffer(text.ljust(4, _PAD), "<u4")[0])


def _groups(v: np.ndarray, out: np.ndarray, lead: bytes = b"") -> None:
    """``%d`` of non-negative int64 ``v`` (below ``1000^groups``) into the ``(n, groups)`` words ``out``, after
    ``lead`` (at most one byte: it goes in the first word's spare byte)."""
    groups = out.shape[1]
    parts = []
    rest = v
    for _ in range(groups - 1):
        rest, low = np.divmod(rest, 1000)
        parts.append(low)
    parts.append(rest)
    parts = parts[::-1]  # most significant first
    started = np.zeros(v.shape[0], bool)
    for g, part in enumerate(parts):
        first = _ONLY if g == groups - 1 else _LEAD
        out[:, g] = np.where(started, _ZEROS.take(part), first.take(part))
        started |= part > 0
    if lead:
        out[:, 0] |= np.uint32(lead[0])


def integer(values: np.ndarray, lead: bytes = b"") -> np.ndarray:
    """``%d`` of a 1-D array of non-negative integers as a field, after the literal ``lead`` (at most one byte)."""
    v = np.asarray(values).astype(np.int64, copy=False).reshape(-1)
    if len(lead) > 1:
        raise ValueError("integer() takes a lead of at most one byte")
    if v.size and int(v.min()) < 0:
        raise ValueError("integer() formats non-negative values only")
    groups = -(-len(str(int(v.max()))) // 3) if v.size else 1
    out = np.empty((v.size, groups), np.uint32)
    _groups(v, out, lead)
    return out


def fixed6(values: np.ndarray, lead: bytes = b"") -> np.ndarray:
    """``%.6f`` of a 1-D float array as a field, after the literal ``lead`` (up to 3 bytes; see the module
    docstring for exactness).

    Raises:
        ValueError: non-finite values or ``|x| >= 1e9``.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(lead) > 3:
        raise ValueError("fixed6() takes a lead of at most 3 bytes")
    if x.size and (not np.isfinite(x).all() or float(np.abs(x).max()) >= 1e9):
        raise ValueError("fixed6() needs finite values below 1e9 in magnitude")
    scaled = np.rint(np.abs(x) * 1e6).astype(np.int64)
    whole, frac = np.divmod(scaled, 1_000_000)
    groups = -(-len(str(int(whole.max()))) // 3) if x.size else 1
    out = np.empty((x.size, 1 + groups + 2), np.uint32)
    plain, minus = _word(lead), _word(lead + b"-")
    out[:, 0] = np.where(np.signbit(x), minus, plain)
    _groups(whole, out[:, 1:1 + groups])
    hi, lo = np.divmod(frac, 1000)
    out[:, -2] = _ZEROS.take(hi) | np.uint32(ord("."))  # the dot in the spare byte before the first decimals
    out[:, -1] = _ZEROS.take(lo)
    return out


def lookup_table(strings: Sequence[str]) -> np.ndarray:
    """``(len(strings), k)`` words of the strings, each padded to ``k`` words: the table :func:`lookup` indexes
    (build it once)."""
    width = -(-max(len(s) for s in strings) // 4)
    return np.frombuffer(b"".join(s.encode("ascii").ljust(4 * width, _PAD) for s in strings), "<u4").reshape(
        len(strings), width)


def lookup(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[codes]`` as a field: exact text for a small set of values, e.g. ``" %.6f" % (k / 255)`` for the
    256 colour levels (``table`` from :func:`lookup_table`)."""
    return table[np.asarray(codes).reshape(-1)]


def rows(fields: Sequence[Field], n: int) -> bytes:
    """``n`` lines, each the concatenation of ``fields`` (literals and fields of ``n`` rows) and ``\\n``."""
    if n == 0:
        return b""
    blocks: list[np.ndarray] = []
    for f in fields:
        if isinstance(f, bytes):
            blocks.append(np.frombuffer(f.ljust(-(-len(f) // 4) * 4, _PAD), "<u4")[None])
        else:
            if f.ndim != 2 or f.shape[0] != n or f.dtype != np.uint32:
                raise ValueError(f"a field must be ({n}, k) uint32, got {f.shape} {f.dtype}")
            blocks.append(f)
    blocks.append(np.array([[_word(b"\n")]], np.uint32))
    table = np.empty((n, sum(b.shape[1] for b in blocks)), np.uint32)
    col = 0
    for b in blocks:
        table[:, col:col + b.shape[1]] = b
        col += b.shape[1]
    return table.tobytes().translate(None, _PAD)
