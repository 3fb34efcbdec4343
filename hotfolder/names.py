"""File names as the operating system gives them: bytes, kept whole, shown losslessly, kept short.

A Linux file name is a sequence of bytes, not text: old Windows and Samba clients write Latin-1
names, and a name may hold a newline. Python hands such a name over as a ``str`` whose
undecodable bytes are lone surrogates (PEP 383, ``surrogateescape``); every ``os`` call turns it
back into the same bytes. The daemon keeps names in that form from intake to archive and
converts them only where text is required (the journal, JSON sidecars, log lines, web pages),
with :func:`escape`, which loses nothing.

Every name the daemon derives (outputs, archive names with a job tag, sidecars, temp files) must
fit the file system's NAME_MAX of 255 *bytes*: :func:`fit` shortens the stem on a character
boundary and keeps the extension, so the same input always gives the same name.
"""

from __future__ import annotations

import os
import re

NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX, also ext4, XFS, Btrfs, tmpfs)
_UNESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def byte_length(name: str) -> int:
    """Length of ``name`` in bytes on disk (``surrogateescape`` names included)."""
    return len(os.fsencode(name))


# Bidirectional controls (Unicode's Bidi_Control property): shown as they are, U+202E would
# display "gpj.exe" reversed, so one user's photo could pass for another's on the status page.
_BIDI_CONTROLS = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def _invisible(code: int) -> bool:
    """A C0 or C1 control character or a bidirectional control: shown as its bytes."""
    return code < 0x20 or 0x7F <= code <= 0x9F or code in _BIDI_CONTROLS


def _as_bytes(char: str) -> str:
    return "".join(f"\\x{byte:02x}" for byte in char.encode("utf-8"))


def escape(name: str) -> str:
    """``name`` as printable text, losslessly: a backslash becomes ``\\\\``, a control character
    (C0, C1, or a bidirectional control such as U+202E) or a byte that is not UTF-8 becomes
    ``\\xNN`` for each of its bytes, everything else stays.

    >>> escape("caf\\udce9.jpg"), escape("line\\nbreak.jpg")
    ('caf\\\\xe9.jpg', 'line\\\\x0abreak.jpg')

    The result is valid UTF-8 with no control characters, so it is safe for SQLite, JSON, one
    log line, and (after HTML escaping) a web page; :func:`unescape` gives the name back.
    """
    out = []
    for char in name:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif _invisible(code):
            out.append(_as_bytes(char))
        else:
            out.append(char)
    return "".join(out)


def printable(text: str) -> str:
    """``text`` (a message that may quote names) made safe for one line of UTF-8: control
    characters and undecodable bytes as ``\\xNN``. Unlike :func:`escape`, backslashes stay
    as they are, so names already escaped inside the message read the same; use it for
    messages, never to store a name."""
    return "".join(
        f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
        else _as_bytes(c) if _invisible(ord(c))
        else c
        for c in text
    )  # fmt: skip


def unescape(text: str) -> str:
    """The name :func:`escape` was given (``surrogateescape`` form). Raises ValueError for text
    that :func:`escape` cannot have produced."""
    raw = bytearray()
    position = 0
    for match in _UNESCAPE.finditer(text):
        raw += text[position : match.start()].encode("utf-8", "surrogateescape")
        token = match.group(1)
        raw += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        position = match.end()
    raw += text[position:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def fit(stem: str, suffix: str = "", limit: int = NAME_MAX) -> str:
    """``stem + suffix``, with the stem cut at a character boundary so that the whole name is at
    most ``limit`` bytes. The suffix (an extension, a tag) is always kept whole; at least one
    character of the stem is kept. Deterministic: the same arguments give the same name.

    Raises ValueError if the suffix alone leaves no room for one character of the stem.
    """
    budget = limit - byte_length(suffix)
    if byte_length(stem) <= budget:
        return stem + suffix
    kept, used = [], 0
    for char in stem:
        size = byte_length(char)
        if used + size > budget:
            break
        kept.append(char)
        used += size
    if not kept:
        raise ValueError(f"no room for a name before {escape(suffix)!r} in {limit} bytes")
    return "".join(kept) + suffix


def fit_name(name: str, limit: int = NAME_MAX) -> str:
    """A whole file name (``stem.ext``) shortened by its stem to ``limit`` bytes."""
    stem, ext = os.path.splitext(name)
    if byte_length(ext) >= limit:  # an "extension" that long is really part of the name
        stem, ext = name, ""
    return fit(stem, ext, limit)


def sanitize(stem: str) -> str:
    """A stem safe to show in an output name: control characters (a newline, say) become ``_``.
    Undecodable bytes stay as they are, so a Latin-1 photo gives a Latin-1 output name."""
    return "".join("_" if ord(c) < 32 or ord(c) == 0x7F else c for c in stem)
