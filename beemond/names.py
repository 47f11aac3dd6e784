"""Names beemond accepts wherever they come from: sensor and host names, and relative record paths.

Neutral: the device's config loader and record writers and the lab's ingest (which checks what a
bundle's manifest claims before it makes a directory of it) import it; it imports nothing of beemond's
but the spool's own file-name marks and beemond.errors, and no third-party library.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from beemond.errors import FormatError
from beemond.spool import META_SUFFIX, TMP_MARK

# A sensor, processor, probe or input name: a path component and a metric label value.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# A host name (RFC 1123 label characters, dots allowed): the first part of every bundle name.
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")


class TemplateError(FormatError, ValueError):
    """A template that does not compile or renders to an unsafe name."""


def safe_relative(name: str) -> str:
    """*name* as a normalised relative POSIX path that stays inside its directory. Raises
    :class:`TemplateError` for an empty or absolute path, a backslash or NUL, a ``..`` or hidden
    component, or a name that collides with beemond's own temporary and sidecar names."""
    path = PurePosixPath(name)
    if not name or not path.parts or path.is_absolute() or "\\" in name or "\x00" in name:
        raise TemplateError(f"rendered name {name!r} is not a relative path")
    for part in path.parts:
        if part in ("", ".", "..") or part.startswith("."):
            raise TemplateError(f"rendered name {name!r} would leave its directory or be hidden")
    if name.endswith(META_SUFFIX) or TMP_MARK in name:
        raise TemplateError(f"rendered name {name!r} collides with beemond's own file names")
    return str(path)
