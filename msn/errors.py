"""One exception type for everything a user can get wrong, so the CLI prints it as one clear line."""

from __future__ import annotations


class MsnError(Exception):
    """Bad input or an unusable environment; the message names the file, line or field at fault."""


class InputError(MsnError, ValueError):
    """Bad input data. ``where`` is e.g. ``data.jsonl:12`` and ``field`` the offending key, if any."""

    def __init__(self, message: str, where: str | None = None, field: str | None = None):
        self.where, self.field = where, field
        prefix = f"{where}: " if where else ""
        suffix = f" (field {field!r})" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")
