"""Output paths, checked before any work starts, and written atomically when the work is done.

A read-only folder, a file where a folder belongs (or the reverse) or a missing permission is found in a
millisecond here instead of after an hour of measuring, and a crash or a full disk while writing never
leaves half a file where a whole one was.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from msn.errors import InputError

_WHY = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a file is where a folder is needed",
    errno.EISDIR: "a folder is where a file is needed",
}


def os_error_reason(e: OSError) -> str:
    return _WHY.get(e.errno or 0, e.strerror or str(e))


def _probe(folder: Path, flag: str, shown: Path) -> None:
    """Create and delete one hidden file in ``folder``: the only sure test that we can write there."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".msn-write-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise InputError(f"cannot write to {shown} ({os_error_reason(e)}); choose another {flag}") from None


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` is (or can become) a writable folder. Creates nothing: an unusable path leaves no trace."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p} is a file, not a folder; choose a folder for {flag}")
    base = _first_existing(p.absolute())
    if not base.is_dir():
        raise InputError(f"{base} is a file, so {p} cannot be a folder; choose another {flag}")
    _probe(base, flag, p if base == p.absolute() else base)
    return p


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` can be written as a file: not a folder, and its (nearest existing) parent writable."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p} is a folder; give a file name for {flag}")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"cannot write to {p} (permission denied); choose another {flag}")
    base = _first_existing(p.absolute().parent)
    if not base.is_dir():
        raise InputError(f"{base} is a file, so {p} cannot be created; choose another {flag}")
    _probe(base, flag, base)
    return p


SMALL_JSON_BYTES = 64 << 20  # files msn writes as "its own" JSON are far smaller


def read_small_json(path: str | os.PathLike):
    """The JSON in ``path``, or None when it is missing, unreadable, not JSON or larger than any file msn would
    write: used to ask "did msn write this file?" before replacing it, without reading a user's 10 GB dataset
    that ``--out`` names by mistake."""
    p = Path(path)
    try:
        if p.stat().st_size > SMALL_JSON_BYTES:
            return None
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


OWNER_KEY = "msn_output"  # a result file msn writes carries {"msn_output": KIND}: how msn knows it may replace it


def owned(data, kind: str) -> bool:
    """Whether parsed JSON ``data`` is a file msn wrote as ``kind`` (its marker, not a look-alike's keys)."""
    return isinstance(data, dict) and data.get(OWNER_KEY) == kind


def _new_file_mode(existing: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file's own, else 0666 less the umask (mkstemp's
    0600 would hide a result from the user's group, unlike every other file msn writes)."""
    try:
        return existing.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    On any error (disk full, ...) the temporary file is removed and the old ``path``, if any, is untouched. A
    ``path`` that is a symbolic link is written through, as ``open`` would: its target is replaced, the link
    stays (replacing the link by a file would cut it from where the user keeps the file)."""
    p = Path(path)
    if p.is_symlink():
        p = Path(os.path.realpath(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(p)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
