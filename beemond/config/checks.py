"""Bad-input checks that no single key's type or range can express, called from :mod:`beemond.config`.

Each yields the problems it finds as ``(key, message)`` pairs; the loader raises the first as a
:class:`beemond.config.ConfigError` (exit 78, one line naming the file and the key). This module
imports nothing of the loader's, so the two never import each other.

- :func:`ini_shadowing`: an INI section that shadows a key (``[sensor.a]`` with ``replay = x``
  and a ``[sensor.a.replay]`` section): one of the two would silently win, or the loader would trip
  over a string where it expects a table.
- :func:`semantic_problems` (the full load only; it warns of the placeholder recipient):
  ``metrics.address`` must be an IP address (prometheus_client binds it as given; a host name would
  be resolved at every start, and an interface name never works);
  ``daemon.spool_dir`` must be a directory (or not exist yet under a directory) on a real file
  system: on ``proc``, ``sysfs``, ``devtmpfs``, ``cgroup`` and the other kernel pseudo file systems
  writes fail or vanish. A spool on ``tmpfs``/``ramfs`` works but loses every record and bundle not
  yet uploaded at a power cut or reboot: a warning, not an error, because a test bench or a
  container may want exactly that (and some systems put ``/tmp`` on tmpfs).

Name templates and the upload layout are checked where they are rendered (:func:`beemond.core.names.
check_template`, :func:`beemond.core.names.check_layout`: the sandbox with size and time limits).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# Kernel pseudo file systems (proc(5), sysfs(5), ...): nothing written there is a file on a disk.
# Not autofs: it holds the place of a disk mounted at first access (fstab x-systemd.automount, a USB
# disk on a Pi), and stat() of the mount point itself does not trigger that mount.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
    "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs", "efivarfs", "binfmt_misc", "rpc_pipefs", "nsfs",
    "selinuxfs"})
# In memory: works, and loses the spool at a power cut.
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL = re.compile(r"\\([0-7]{3})")
# config/simulated.toml's recipient: its identity was thrown away, so that file passes check-config as
# shipped. Sealing real recordings to it loses them: a warning at every load (the demo replaces it).
PLACEHOLDER_RECIPIENT = "age1fv46ddmd28x6qqd0ph7xq7clhl37dpflzgc04758cjc6lmhvpdwq7rkpq9"


Problems = Iterator[tuple[str, str]]   # (key, message)


def ini_shadowing(sections: dict[str, tuple[str, ...]]) -> Problems:
    """*sections*: INI section -> the keys it holds (``DEFAULT`` included). A key of one section that
    another section uses as a table (the loader nests ``[sensor.a.replay]`` under ``[sensor.a]`` as
    ``sensors.a.replay``); two sections naming one table; a ``[DEFAULT]`` section, whose keys
    configparser copies into every section (no beemond key fits every table)."""
    if sections.get("DEFAULT"):
        yield "DEFAULT", "a [DEFAULT] section sets its keys in every section; set each key in its own section"
    tables = {}
    for section, keys in sections.items():
        if section == "DEFAULT":
            continue
        keys = tuple(k for k in keys if k not in sections.get("DEFAULT", ()))
        parts = section.split(".")
        if parts[0] in ("sensor", "processor"):  # as beemond.config.loader._ini_tree maps them
            parts[0] += "s"
        if tuple(parts) in tables:  # [sensor.a] and [sensors.a]: one would silently override the other
            yield ".".join(parts), f"[{tables[tuple(parts)][0]}] and [{section}] are the same table: keep one"
        tables[tuple(parts)] = (section, keys)
    for parts, (section, keys) in tables.items():
        for key in keys:
            for other, (other_section, _) in tables.items():
                if other[:len(parts) + 1] == (*parts, key):
                    yield ".".join((*parts, key)), (f"set as a key in [{section}] and used as the table "
                                                    f"[{other_section}]: keep one of them")


def semantic_problems(cfg, path: Path) -> Problems:
    """The full load's checks of ``metrics.address`` and ``daemon.spool_dir`` (see the module)."""
    try:
        ipaddress.ip_address(cfg.metrics.address)
    except ValueError:
        yield "metrics.address", ("must be an IP address, e.g. 127.0.0.1 (this machine only), 0.0.0.0 (every "
                                  f"interface) or ::1; got {cfg.metrics.address!r}")
    for message in spool_dir_problems(cfg.daemon.spool_dir, path):
        yield "daemon.spool_dir", message
    for i, item in enumerate(cfg.bundle.recipients):
        if item.strip() == PLACEHOLDER_RECIPIENT:
            log.warning("%s: bundle.recipients[%d]: the placeholder of config/simulated.toml: nobody holds its "
                        "identity, so no bundle sealed to it can be decrypted; name the lab's recipient", path, i)


def spool_dir_problems(spool: Path, path: Path) -> Iterator[str]:
    existing = spool
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        # worded as the daemon's own check at start (Orchestrator.run), which this one comes before
        yield f"cannot create or write {spool}: " + ("not a directory" if existing == spool else
                                                      f"{existing} is not a directory")
        return
    fstype = filesystem_type(existing)
    if fstype in PSEUDO_FILESYSTEMS:
        yield f"{spool} is on a {fstype} pseudo file system, not a disk"
    elif fstype in VOLATILE_FILESYSTEMS:
        log.warning("%s: daemon.spool_dir: %s is on %s (in memory): records and bundles not yet uploaded are "
                    "lost at a power cut or reboot", path, spool, fstype)


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding the existing *path* (``/proc/self/mountinfo``, proc(5): the
    mount point that is the longest prefix of its real path); None if unknown."""
    real = os.path.realpath(path)
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        # mount points escape space, tab, newline and backslash as octal (\040), and nothing else: a
        # label in UTF-8 stays as it is (unicode_escape would read its bytes as Latin-1)
        point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # >=: the last of stacked mounts is the visible one
            best, fstype = point, right.split()[0]
    return fstype
