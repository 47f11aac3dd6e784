"""Names beemond accepts wherever they come from: sensor and host names, and relative record paths.

Neutral: the device's config loader and record writers and the lab's ingest (which checks what a
bundle's manifest claims before it makes a directory of it) import it; it imports nothing of beemond's
but the file-name mark of beemond.core.fsio and beemond.errors, and no third-party library.

Filename templates (:func:`render_name`, :func:`check_template`, :func:`check_layout`) render in
Jinja2's sandbox (``ImmutableSandboxedEnvironment`` with ``StrictUndefined``, so a typo in a template
is an error at config load rather than an empty string in a file name). Jinja2 is imported on the
first render: the orchestrator and the lab import this module for the name checks alone.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from beemond.errors import FormatError
from beemond.core.fsio import TMP_MARK

# A record's metadata sidecar is NAME + META_SUFFIX (beemond.spool); no rendered name may end so.
META_SUFFIX = ".meta.json"

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


# ------------------------------------------------------------------------------------------ templates

if TYPE_CHECKING:
    import jinja2


# A name is a few hundred bytes at most. A template that would make more, or compute for long, is a
# mistake to report at config load, not a gigabyte allocated on a 512 MB Pi at the first record:
TEMPLATE_MAX_CHARS = 2000   # the template's source
NAME_MAX_CHARS = 1024       # a rendered name (Linux: 255 bytes per component, 4096 per path)
OPERAND_MAX = 10_000        # the largest width, repetition, range, slice count or exponent
PRODUCT_MAX_BITS = 4096     # a product of numbers (a loop squaring a number would grow it without end)
# The filters whose number arguments size their result or its making (jinja2.filters: width, count,
# indent); the others' numbers are values (default(44100), int(48000), select("lt", 50000)).
_SIZING_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "slice", "batch", "tojson"})
CHECK_TIME_S = 1.0          # the trial render at load (a loop or a recursive macro that runs away)
_WIDE_FORMAT = re.compile(r"%[^a-zA-Z%]*(\*|\d{5,})|\{[^{}]*:[^{}]*(\{|\d{5,})")  # "%99999d", "{:>{w}}"


class _TooBig(TemplateError):
    """A number or format in a template that would make a result larger than any name."""


def _bounded(*values) -> None:
    """Raise :class:`_TooBig` for a number over :data:`OPERAND_MAX` or a format string with a field
    width or precision of 5+ digits (or one taken from an argument)."""
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > OPERAND_MAX:
            raise _TooBig(f"{v!r} is larger than a name template may use ({OPERAND_MAX})")
        if isinstance(v, str) and _WIDE_FORMAT.search(v):
            raise _TooBig(f"format {v[:40]!r} asks for a field wider than a name")


@functools.lru_cache(maxsize=None)
def _sandbox():
    """Jinja2 and the sandbox names are rendered in, built on the first render: importing this
    module loads no Jinja2 (the orchestrator and the lab import it for the name checks alone)."""
    import jinja2
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _NameSandbox(ImmutableSandboxedEnvironment):
        """Jinja2's immutable sandbox with size limits: a repetition, an exponent, ``range`` and the
        sizing filters get their numbers checked against :data:`OPERAND_MAX`, a ``%`` format string its
        field widths, a product of numbers its size (``"x" * 10**9``, ``9**9**9``, ``"x"|center(10**9)``
        and ``"%999999999d" % 1`` would each allocate or compute in one C call, before any time limit)."""

        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "%" and isinstance(left, str):
                _bounded(left)
            elif operator == "*" and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
                seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                if isinstance(n, int) and len(seq) * n > OPERAND_MAX:
                    raise _TooBig(f"a repetition longer than {OPERAND_MAX}")
            elif operator == "*":  # numbers: the product's digits are the operands' digits added, not multiplied
                if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > PRODUCT_MAX_BITS:
                    raise _TooBig(f"a product of more than {PRODUCT_MAX_BITS} bits")
            elif operator == "**":  # "%" of numbers is never larger than its divisor
                _bounded(right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            # range(N) and a string's ljust/center/zfill/expandtabs(N): a number argument sizes the result.
            # Not other calls (metadata.get("id", 123456)) and not str.format's arguments: they are
            # values, and its format string was checked at wrap_str_format.
            sizes = __obj is _env.globals.get("range") or isinstance(getattr(__obj, "__self__", None), str)
            if sizes and not getattr(__obj, "_format_checked", False):
                _bounded(*(a for a in (*args, *kwargs.values()) if not isinstance(a, str)))
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                _bounded(value.__self__)
                wrapped._format_checked = True
            return wrapped

    _env = _NameSandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
    _env.filters = {name: _checked_filter(name, f) for name, f in _env.filters.items()}
    _env.globals.pop("lipsum", None)  # paragraphs of Latin are no part of a name
    return types.SimpleNamespace(_env=_env, jinja2=jinja2)


def _checked_filter(name: str, f):
    """*f* with its size arguments bounded: those of :data:`_SIZING_FILTERS` (``center(width)``,
    ``indent(width)``, ``slice(slices)``...); never the value filtered (a record's metadata may hold
    any number) nor another filter's values (``default(44100)``), and for ``format`` only the format
    string."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # (context or environment,) value

    @functools.wraps(f)
    def checked(*args, **kwargs):
        if name == "format":
            _bounded(*(a for a in args[skip - 1:skip] if isinstance(a, str)))
        elif name in _SIZING_FILTERS:
            _bounded(*(a for a in (*args[skip:], *kwargs.values()) if not isinstance(a, str)))
        return f(*args, **kwargs)
    return checked


def utc_stamp(t: datetime) -> str:
    """ISO 8601 basic format in UTC, e.g. ``20210619T000458Z``: sortable, and safe in any file system."""
    return t.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# Trial values for load-time checks. Record metadata differs per sensor, so any key is accepted there
# (a name built from a key a record lacks falls back to the default template at write time).
_SAMPLE = {"host": "hive", "sensor": "s", "group": "all", "start": "20210619T000000Z", "end": "20210619T001000Z",
           "ext": "csv", "date": "2021-06-19", "_split_index": 0, "name": "b.tar.age",
           "metadata": collections.defaultdict(lambda: "x")}


@functools.lru_cache(maxsize=64)  # a name is rendered per record and per upload; compiling costs ~1 ms
def _compile(text: str) -> jinja2.Template:
    _env = _sandbox()._env
    jinja2 = _sandbox().jinja2
    if len(text) > TEMPLATE_MAX_CHARS:
        raise TemplateError(f"template longer than {TEMPLATE_MAX_CHARS} characters")
    try:
        tree = _env.parse(text)
        # No loader: these would only fail later, at the first record.
        for node in tree.find_all((jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport,
                                   jinja2.nodes.Extends)):
            raise TemplateError(f"template uses {type(node).__name__.lower()}: a name template is one template")
        return _env.from_string(tree)
    except (jinja2.TemplateError, RecursionError, MemoryError) as e:  # RecursionError: 1,000 nested brackets
        raise TemplateError(f"template does not compile: {e}") from None


def render_name(template: str, **variables: Any) -> str:
    """Render a record name and check it stays inside its directory.

    Returns a relative POSIX path (it may contain ``/`` for sub-directories). Raises
    :class:`TemplateError` for an undefined variable, an absolute path, a ``..`` or hidden
    component, or a name that collides with beemond's own temporary and sidecar names.
    """
    template_ = _compile(template)
    try:
        parts, size = [], 0
        for chunk in template_.generate(**variables):
            size += len(chunk)
            if size > NAME_MAX_CHARS:
                raise TemplateError(f"template renders a name longer than {NAME_MAX_CHARS} characters")
            parts.append(chunk)
    except _TooBig as e:
        raise TemplateError(f"template failed to render: {e}") from None
    except TemplateError:
        raise
    except Exception as e:  # a template is code: 1/0, "a" + 1, a recursive macro, an undefined name
        raise TemplateError(f"template failed to render: {type(e).__name__}: {e}") from None
    return safe_relative("".join(parts).strip())


# What the uploader gives a layout (Uploader.remote_path): a bundle's name carries no record metadata.
_LAYOUT_SAMPLE = {"host": "hive", "name": "hive_20210619T000000Z_all_0123456789ab.tar.age", "sensor": "all",
                  "group": "all", "date": "2021-06-19", "start": "20210619T000000Z", "end": "20210619T000000Z",
                  "ext": "tar.age", "metadata": {}, "_split_index": 0}


class _Deadline(BaseException):
    """Raised into a trial render that runs past :data:`CHECK_TIME_S`; a BaseException (the one class
    outside beemond.errors' tree, never seen outside :func:`_time_limit`), so that no ``except
    Exception`` in a filter swallows it."""


TRIAL_MEMORY_KB = 32 * 1024   # what a trial render may add to the process's resident size


class _time_limit:
    """Abort Python code run in this thread after *seconds* (a trace function: no signal, any thread).

    A class, not a generator context manager: resuming a generator to leave the block is itself a
    traced call, so a deadline passing just after the render would raise there, past the handler.
    Here the trace skips ``__exit__``, which restores the old trace function first."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.deadline = time.monotonic() + self.seconds
        self.statm = os.open("/proc/self/statm", os.O_RDONLY)
        self.rss_limit_kb = self._rss_kb() + TRIAL_MEMORY_KB
        self.old = sys.gettrace()
        sys.settrace(self._trace)
        return self

    def _trace(self, frame, event, arg):
        if frame.f_code is _EXIT_CODE:
            return None
        # Memory too: a template that doubles a string (``~`` is not an operator the sandbox sees) would
        # reach hundreds of MB within the time limit, on a Pi with 512 MB. The resident size now, not
        # getrusage's peak: a forked child (the daemon's config check) inherits its parent's peak.
        if time.monotonic() > self.deadline or self._rss_kb() > self.rss_limit_kb:
            raise _Deadline()
        return self._trace

    def _rss_kb(self) -> int:
        return int(os.pread(self.statm, 64, 0).split()[1]) * _PAGE_KB

    def __exit__(self, kind, value, tb) -> bool:
        sys.settrace(self.old)
        os.close(self.statm)
        if kind is not None and issubclass(kind, _Deadline):
            raise TemplateError(f"template takes longer than {self.seconds:g} s or more than "
                                f"{TRIAL_MEMORY_KB // 1024} MB to render a name") from None
        return False


_EXIT_CODE = _time_limit.__exit__.__code__
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def trial_limit():
    """The load-time checks' bound: a context manager that turns Python run in this thread for more
    than :data:`CHECK_TIME_S` into a :class:`TemplateError` (for any template tried at load)."""
    return _time_limit(CHECK_TIME_S)


def check_template(text: str, metadata: dict | None = None) -> None:
    """Compile and trial-render a filename template with sample values (config-load check), within
    :data:`CHECK_TIME_S`. *metadata*: known record metadata (``[archive] default_metadata``); any other
    key reads as ``"x"``. Raises :class:`TemplateError`."""
    sample = {**_SAMPLE, "metadata": collections.defaultdict(lambda: "x", metadata or {})}
    with _time_limit(CHECK_TIME_S):
        render_name(text, **sample)


def check_layout(text: str) -> None:
    """Compile and trial-render a remote layout template with what a bundle carries (``host``,
    ``date``, ``name``, ``sensor``/``group``, ``start``, ``end``, ``ext``; ``metadata`` is empty).
    Raises :class:`TemplateError`."""
    try:
        with _time_limit(CHECK_TIME_S):
            render_name(text, **_LAYOUT_SAMPLE)
    except TemplateError as e:
        if "UndefinedError" in str(e):
            carried = ", ".join(k for k in _LAYOUT_SAMPLE if k[0] != "_" and k != "metadata")
            raise TemplateError(f"{e}; a bundle carries only {carried} (no record metadata)") from None
        raise


def member_name(sensor: str, start: datetime, end: datetime, ext: str) -> str:
    """A record's name in a bundle, ``<sensor>_<from>_<to><ext>`` (UTC, ISO 8601 basic, e.g.
    ``hive_climate_20210619T000458Z_20210619T001458Z.csv``); *ext* starts with a dot. It is what the
    default ``filename_template`` renders (wacryptolib's TarfileRecordAggregator names its members so)."""
    if not ext.startswith("."):
        raise ValueError(f"extension must start with a dot, got {ext!r}")
    return safe_relative(f"{sensor}_{utc_stamp(start)}_{utc_stamp(end)}{ext}")
