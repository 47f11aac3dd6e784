#!/usr/bin/env python3
"""Move beemond's bottom layer into ``beemond/core/`` and dissolve ``beemond/archive.py`` (issue 13).

Usage (from anywhere inside the repository; the work tree must be clean)::

    python3 scripts/restructure_core.py            # rewrite, git mv / git rm, leave it staged
    python3 scripts/restructure_core.py --check    # say what it would change, touch nothing (exit 1 if any)
    python3 scripts/restructure_core.py --place NAME=names|records   # a new archive.py definition's home

What it does, on whatever the tree looks like when it runs:

1. ``git mv beemond/{clock,journal,notify,names}.py beemond/core/`` and creates ``beemond/core/__init__.py``.
2. ``beemond/core/fsio.py`` gets the crash-safe file primitives of ``beemond/spool.py`` (``atomic_writer``,
   ``fsync_dir``, ``temp_name``, ``TMP_MARK``, ``is_internal``, ``remove_stale_temps``); spool imports what
   it still uses from there.
3. ``beemond/archive.py`` is dissolved: templates (``render_name``, ``check_template``, ...) go to
   ``core/names.py`` with Jinja2 imported lazily; the record writers (``ArrayArchiver``, ``JsonArchiver``,
   ``BackgroundWriter``, ``with_default_metadata``) go to ``beemond/records.py``; what archive.py only
   re-exported is referenced at its real home (``beemond.spool``, ``beemond.core.clock``, ...).
4. Every import and use of the moved names is rewritten (module-level and function-level imports,
   ``archive.X`` attributes, ``from beemond.archive import X``, strings such as ``"beemond.clock"``,
   ``"from beemond import clock"`` in code run by subprocesses, paths, docstrings, README, pyproject).

Everything is computed in memory first and checked (every Python file parses, no reference to a moved
name is left); only then are files written and moved. Anything the script does not understand (a
definition in archive.py without a home, ``import beemond.archive``, ``archive`` used other than as
``archive.X``, a name clash with a new import) stops it with a message naming file and line, and
nothing is changed. Running it again on its own output changes nothing.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

SELF = Path("scripts/restructure_core.py")
ROOTS = ("beemond", "tests", "bench", "scripts", "contrib", "config", "systemd", ".ci")
TOP_FILES = ("README.md", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".ini", ".cfg", ".txt", ".rst", ".sh", ".service", ".rules", ".yml",
                 ".yaml", ".json", ""}

CORE_MODULES = ("clock", "journal", "notify", "names")          # beemond/X.py -> beemond/core/X.py
FSIO_NAMES = ("TMP_MARK", "_STALE_TEMP_RE", "fsync_dir", "atomic_writer", "temp_name", "is_internal",
              "remove_stale_temps")
FSIO_REQUIRED = ("TMP_MARK", "fsync_dir", "atomic_writer", "temp_name", "is_internal")
FSIO_PUBLIC = tuple(n for n in FSIO_NAMES if not n.startswith("_"))

# archive.py's own definitions: where each goes ("names" = beemond.core.names, "records" = beemond.records).
ARCHIVE_PLACES = {
    "utc_stamp": "names", "_SAMPLE": "names", "_compile": "names", "render_name": "names",
    "check_template": "names", "check_layout": "names", "member_name": "names", "_env": "names",
    "ArrayArchiver": "records", "JsonArchiver": "records", "BackgroundWriter": "records",
    "with_default_metadata": "records",
}
# Where each name archive.py offered lives once it is gone (used when archive.py is already gone, so a
# late merge that still says archive.X is rewritten too). Derived again from archive.py when it exists.
KNOWN_HOMES = {
    **{k: "beemond.core.names" for k, v in ARCHIVE_PLACES.items() if v == "names"},
    **{k: "beemond.records" for k, v in ARCHIVE_PLACES.items() if v == "records"},
    **{k: "beemond.core.fsio" for k in FSIO_NAMES},
    **{k: "beemond.spool" for k in ("META_SUFFIX", "sidecar_of", "write_record", "write_sidecar")},
    **{k: "beemond.core.clock" for k in ("parse_iso", "utc_iso", "Backoff")},
    **{k: "beemond.core.names" for k in ("TemplateError", "safe_relative")},
}
SHORT = {"beemond.core.names": "names", "beemond.records": "records", "beemond.core.fsio": "fsio",
         "beemond.spool": "spool", "beemond.core.clock": "clock"}
JINJA_NAMES = {"jinja2", "ImmutableSandboxedEnvironment"}


class Refuse(Exception):
    """Something the script does not understand: nothing has been changed."""


# ------------------------------------------------------------------------------------------ helpers

def git(*args: str, root: Path) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def offsets(text: str):
    """(line, utf-8 column) -> str index, for ast positions."""
    starts, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    lines = text.splitlines(keepends=True)

    def at(lineno: int, col: int) -> int:
        if lineno - 1 >= len(lines):
            return len(text)
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())
    return at


def apply_edits(text: str, edits: list[tuple[int, int, str]], where: str) -> str:
    edits = sorted(edits)
    for (a1, b1, _), (a2, _b2, _) in zip(edits, edits[1:]):
        if a2 < b1:
            raise Refuse(f"{where}: overlapping rewrites at offset {a2}")
    for a, b, new in reversed(edits):
        text = text[:a] + new + text[b:]
    return text


def parse(text: str, where: str) -> ast.Module:
    try:
        return ast.parse(text, where)
    except SyntaxError as e:
        raise Refuse(f"{where}:{e.lineno}: does not parse ({e.msg})") from None


def parents(tree: ast.AST) -> dict:
    up = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            up[child] = node
    return up


def scope_of(node, up) -> ast.AST:
    while node in up:
        node = up[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module)):
            return node
    return node


def bound_names(tree: ast.AST) -> dict[str, list[ast.AST]]:
    """Every name bound anywhere in the file (any scope), with the nodes that bind it."""
    out: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            out.setdefault(node.id, []).append(node)
        elif isinstance(node, ast.arg):
            out.setdefault(node.arg, []).append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.setdefault(node.name, []).append(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out.setdefault(a.asname or a.name.split(".")[0], []).append(node)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            out.setdefault(node.name, []).append(node)
    return out


def import_target(node: ast.AST, alias: ast.alias) -> str:
    """The dotted thing an import alias binds: ``beemond.spool`` or ``beemond.spool.write_record``."""
    if isinstance(node, ast.Import):
        return alias.name
    return f"{node.module}.{alias.name}" if node.module else alias.name


def stmt_span(text: str, at, node: ast.stmt, where: str) -> tuple[int, int, str, str]:
    """(start of its first line, end of its last line incl. newline, indentation, trailing comment)."""
    start = at(node.lineno, 0)
    end_stmt = at(node.end_lineno, node.end_col_offset)
    line_end = text.find("\n", end_stmt)
    line_end = len(text) if line_end < 0 else line_end + 1
    head = text[start:at(node.lineno, node.col_offset)]
    tail = text[end_stmt:line_end].rstrip("\n")
    if head.strip() or (tail.strip() and not tail.strip().startswith("#")):
        raise Refuse(f"{where}:{node.lineno}: an import sharing its line with other statements")
    return start, line_end, head, tail.strip()


def format_from(module: str, names: list[str], indent: str, comment: str = "") -> str:
    line = f"{indent}from {module} import {', '.join(names)}"
    if comment:
        line += "  " + comment
    if len(line) > 118:
        body = ",\n".join(f"{indent}    {n}" for n in names)
        line = f"{indent}from {module} import (  {comment}\n{body},\n{indent})" if comment else \
            f"{indent}from {module} import (\n{body},\n{indent})"
    return line + "\n"


def name_order(name: str) -> tuple:
    """isort's order for imported names: CONSTANTS, then Classes, then functions and modules."""
    bare = name.split(" as ")[0]
    return (0 if bare.isupper() else 1 if bare[:1].isupper() else 2, bare.lower())


def alias_text(a: ast.alias) -> str:
    return f"{a.name} as {a.asname}" if a.asname else a.name


# ------------------------------------------------------------------------------------------ the tree in memory

class Tree:
    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, str] = {}       # path -> text as it will be
        self.original: dict[str, str] = {}
        self.moves: list[tuple[str, str]] = []
        self.removed: list[str] = []
        self.log: list[str] = []
        tracked = git("ls-files", "-z", root=root).split("\0")
        for rel in tracked:
            if not rel or rel == str(SELF):
                continue
            if not (rel in TOP_FILES or rel.split("/")[0] in ROOTS):
                continue
            if Path(rel).suffix not in TEXT_SUFFIXES:
                continue
            p = root / rel
            if not p.is_file() or p.stat().st_size > 2_000_000:
                continue
            try:
                self.files[rel] = self.original[rel] = p.read_text()
            except UnicodeDecodeError:
                continue

    def exists(self, rel: str) -> bool:
        return rel in self.files

    def move(self, old: str, new: str) -> None:
        self.files[new] = self.files.pop(old)
        self.moves.append((old, new))
        self.log.append(f"git mv {old} {new}")

    def py(self):
        return [p for p in sorted(self.files) if p.endswith(".py")]


# ------------------------------------------------------------------------------------------ step 1: core/

CORE_INIT = '''"""beemond's bottom layer: what every other part may import and which imports nothing of beemond's
above it.

- :mod:`beemond.core.clock`: UTC stamps that never go backwards (:class:`Clock`), clock synchronisation,
  :class:`Backoff`;
- :mod:`beemond.core.fsio`: crash-safe files (temporary name, fsync, rename, fsync the directory);
- :mod:`beemond.core.names`: sensor and host names, safe relative record paths, sandboxed Jinja2
  filename templates (Jinja2 is imported on first render);
- :mod:`beemond.core.journal`: logging to the systemd journal or a terminal;
- :mod:`beemond.core.notify`: ``sd_notify`` for ``Type=notify`` and the watchdog.
"""
'''


def step_core(t: Tree) -> None:
    for m in CORE_MODULES:
        old, new = f"beemond/{m}.py", f"beemond/core/{m}.py"
        if t.exists(old) and t.exists(new):
            raise Refuse(f"both {old} and {new} exist: merge them by hand first")
        if t.exists(old):
            t.move(old, new)
        elif not t.exists(new):
            raise Refuse(f"neither {old} nor {new} exists")
    if not t.exists("beemond/core/__init__.py"):
        t.files["beemond/core/__init__.py"] = CORE_INIT
        t.log.append("created beemond/core/__init__.py")


# ------------------------------------------------------------------------------------------ moving definitions

def top_defs(tree: ast.Module) -> dict[str, ast.stmt]:
    """Top-level name -> the statement defining it (defs, classes, simple assignments)."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for tg in targets:
                if isinstance(tg, ast.Name):
                    out[tg.id] = node
    return out


def top_imports(tree: ast.Module) -> dict[str, tuple[ast.stmt, ast.alias]]:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = (node, a)
    return out


def used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def chunk_text(text: str, at, node: ast.stmt) -> tuple[int, int]:
    """The source span of a top-level statement with its decorators and the comment lines right above."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lines = text.splitlines(keepends=True)
    while first > 1 and lines[first - 2].lstrip().startswith("#") and not lines[first - 2].startswith("# ---"):
        first -= 1
    start = at(first, 0)
    end = at(node.end_lineno, node.end_col_offset)
    nl = text.find("\n", end)
    return start, (len(text) if nl < 0 else nl + 1)


def import_line(node: ast.stmt, a: ast.alias) -> str:
    if isinstance(node, ast.Import):
        return f"import {alias_text(a)}\n"
    return f"from {'.' * node.level}{node.module or ''} import {alias_text(a)}\n"


def group_imports(lines: list[str]) -> str:
    """Import lines (one name each) as a block: ``import x`` first, then ``from m import a, b``."""
    plain, froms = set(), {}
    for line in lines:
        node = ast.parse(line).body[0]
        if isinstance(node, ast.Import):
            plain.add(line)
        else:
            froms.setdefault(node.module, set()).add(alias_text(node.names[0]))
    return "".join(sorted(plain)) + "".join(format_from(m, sorted(n, key=name_order), "")
                                            for m, n in sorted(froms.items()))


def prune_stdlib_imports(text: str, where: str) -> str:
    """Drop the top-level imports of non-beemond modules that nothing in *text* uses any more."""
    tree = parse(text, where)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    at = offsets(text)
    edits = []
    for node in tree.body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        module = node.names[0].name if isinstance(node, ast.Import) else (node.module or "")
        if module.startswith("beemond") or module == "__future__" or getattr(node, "level", 0):
            continue
        keep = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
        if len(keep) == len(node.names):
            continue
        s, e, indent, comment = stmt_span(text, at, node, where)
        if not keep:
            new = ""
        elif isinstance(node, ast.Import):
            new = f"{indent}import {', '.join(alias_text(a) for a in keep)}\n"
        else:
            new = format_from(node.module, [alias_text(a) for a in keep], indent, comment)
        edits.append((s, e, new))
    return apply_edits(text, edits, where)


def insert_imports(text: str, lines: list[str], where: str) -> str:
    """Add import lines after the module's last top-level import (skipping ones already there);
    ``from M import a`` lines are merged into an existing one-line ``from M import ...``."""
    tree = parse(text, where)
    at = offsets(text)
    have = {(type(n).__name__, getattr(n, "module", None), a.name, a.asname)
            for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if not imports:
        raise Refuse(f"{where}: no import block to add to")
    edits, new_lines = [], []
    merged: dict[str, list[str]] = {}
    for line in lines:
        node = ast.parse(line).body[0]
        a = node.names[0]
        if (type(node).__name__, getattr(node, "module", None), a.name, a.asname) in have:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            merged.setdefault(node.module, []).append(alias_text(a))
        else:
            new_lines.append(line)
    for module, names in merged.items():
        host = [n for n in imports if isinstance(n, ast.ImportFrom) and n.module == module and n.level == 0
                and n.lineno == n.end_lineno]
        if host:
            n = host[0]
            s, e, indent, comment = stmt_span(text, at, n, where)
            allnames = [alias_text(a) for a in n.names] + [x for x in names if x not in [alias_text(a) for a in n.names]]
            edits.append((s, e, format_from(module, sorted(allnames, key=name_order), indent, comment)))
        else:
            new_lines.append(format_from(module, sorted(names, key=name_order), ""))
    def ours(line_or_node) -> bool:
        if isinstance(line_or_node, str):
            line_or_node = ast.parse(line_or_node).body[0]
        n = line_or_node
        return (n.names[0].name if isinstance(n, ast.Import) else (n.module or "")).startswith("beemond")

    def after(node) -> int:
        pos = at(node.end_lineno, node.end_col_offset)
        nl = text.find("\n", pos)
        return len(text) if nl < 0 else nl + 1
    # Third-party and stdlib lines after the last such import, beemond's after the last of beemond's.
    for group in (False, True):
        block = sorted(set(ln for ln in new_lines if ours(ln) == group),
                       key=lambda ln: (ln.startswith("from"), ln.lower()))
        if not block:
            continue
        same = [n for n in imports if ours(n) == group and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        if same:
            def key(x) -> tuple:       # isort: `import x` lines first, then `from x import`, by module
                n = ast.parse(x).body[0] if isinstance(x, str) else x
                return (isinstance(n, ast.ImportFrom), (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).lower())
            at_pos: dict[int, list[str]] = {}
            for ln in block:
                later = [n for n in same if key(n) > key(ln)]
                at_pos.setdefault(at(later[0].lineno, 0) if later else after(same[-1]), []).append(ln)
            edits += [(pos, pos, "".join(lns)) for pos, lns in at_pos.items()]
        else:
            pos = after(imports[-1]) if group else after(imports[0])
            edits.append((pos, pos, ("\n" if group else "") + "".join(block) + ("" if group else "\n")))
    return apply_edits(text, edits, where)


# ------------------------------------------------------------------------------------------ step 2: core/fsio.py

FSIO_DOC = '''"""Crash-safe files: temporary name, write, flush, ``fsync``, ``rename``, ``fsync`` the directory.

A power cut at any line leaves either the old file or the new one, never a torn one. A leftover
temporary file (``.NAME.tmp-PID``, :data:`TMP_MARK`) is skipped by every reader (:func:`is_internal`)
and removed at the next start (:func:`remove_stale_temps`). Stdlib only: the orchestrator, the
forkserver and the lab import it.
"""

from __future__ import annotations

'''


def step_fsio(t: Tree) -> None:
    spool_rel, fsio_rel = "beemond/spool.py", "beemond/core/fsio.py"
    if not t.exists(spool_rel):
        raise Refuse(f"{spool_rel} is missing")
    text = t.files[spool_rel]
    tree = parse(text, spool_rel)
    defs = top_defs(tree)
    present = [n for n in FSIO_NAMES if n in defs]
    if t.exists(fsio_rel):
        if present:
            raise Refuse(f"{fsio_rel} exists and {spool_rel} still defines {', '.join(present)}: merge by hand")
        return
    missing = [n for n in FSIO_REQUIRED if n not in defs]
    if missing:
        raise Refuse(f"{spool_rel} does not define {', '.join(missing)}: the tree is not what this script knows")
    moving = {id(defs[n]): defs[n] for n in present}
    nodes = sorted(moving.values(), key=lambda n: n.lineno)
    for node in nodes:      # a statement defining several names must move all of them
        for name, other in defs.items():
            if other is node and name not in present:
                raise Refuse(f"{spool_rel}:{node.lineno}: statement defines {name} too")
    imports = top_imports(tree)
    at = offsets(text)
    need_imports, body = [], []
    for node in nodes:
        for name in sorted(used_names(node)):
            if name in imports:
                need_imports.append(import_line(*imports[name]))
            elif name in defs and id(defs[name]) not in moving:
                raise Refuse(f"{spool_rel}:{node.lineno}: {name} used by a crash-safe primitive is spool's own "
                             f"({name}): it is not generic, move it by hand")
        s, e = chunk_text(text, at, node)
        body.append((s, e))
    header = FSIO_DOC + group_imports(need_imports)
    fsio = header + "\n" + "\n\n".join(text[s:e].rstrip("\n") + "\n" for s, e in body)
    fsio = re.sub(r"\n{3,}(?=\S)", "\n\n\n", fsio)
    # Spool without them, importing what it still uses.
    rest = apply_edits(text, [(s, e, "") for s, e in body], spool_rel)
    rest = re.sub(r"\n# -{10,} crash-safe files\n+", "\n", rest)
    rest = re.sub(r"\n{4,}", "\n\n\n", rest)
    rest_tree = parse(rest, spool_rel)
    still = sorted({n.id for n in ast.walk(rest_tree) if isinstance(n, ast.Name)} & set(FSIO_PUBLIC))
    if still:
        rest = insert_imports(rest, [f"from beemond.core.fsio import {n}\n" for n in still], spool_rel)
    rest = prune_stdlib_imports(rest, spool_rel)
    t.files[spool_rel] = rest
    t.files[fsio_rel] = fsio
    t.log.append(f"created {fsio_rel} with {', '.join(present)} from {spool_rel}")


# ------------------------------------------------------------------------------------------ step 3: archive.py

def is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def annotation_nodes(node: ast.AST) -> set[int]:
    """ids of the Name nodes inside annotations (never evaluated: the files use postponed annotations)."""
    out = set()
    for n in ast.walk(node):
        anns = []
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = n.args
            anns = [a.annotation for a in [*args.args, *args.posonlyargs, *args.kwonlyargs,
                                           *([args.vararg] if args.vararg else []),
                                           *([args.kwarg] if args.kwarg else [])]] + [n.returns]
        elif isinstance(n, ast.AnnAssign):
            anns = [n.annotation]
        for ann in anns:
            if ann is not None:
                out |= {id(x) for x in ast.walk(ann) if isinstance(x, ast.Name)}
    return out


def code_names(node: ast.AST) -> set[str]:
    """Names a statement uses, annotations left out."""
    skip = annotation_nodes(node)
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in skip}


def annotation_names(node: ast.AST) -> set[str]:
    skip = annotation_nodes(node)
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) in skip}


def import_time_names(node: ast.stmt) -> set[str]:
    """Names whose values a top-level statement needs when the module is imported (function bodies
    run later; a class body runs now, its methods' bodies later)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        parts = [*node.decorator_list, *node.args.defaults, *[d for d in node.args.kw_defaults if d]]
        return set().union(*(used_names(p) for p in parts)) if parts else set()
    if isinstance(node, ast.ClassDef):
        parts = [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
        out = set().union(*(used_names(p) for p in parts)) if parts else set()
        for stmt in node.body:
            out |= import_time_names(stmt)
        return out
    return code_names(node)


def indent_block(src: str, where: str, lineno: int) -> str:
    """*src* (one top-level statement) indented by four spaces; refused where that would change a
    string (a multi-line string that is not a docstring)."""
    import io
    import tokenize
    tree = parse(src, where)
    docs = {(n.body[0].lineno, n.body[0].col_offset) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body and is_docstring(n.body[0])}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.STRING and tok.start[0] != tok.end[0] and tok.start not in docs:
            raise Refuse(f"{where}:{lineno + tok.start[0] - 1}: a multi-line string in a statement that must move "
                         "into the lazy Jinja2 builder: indenting it would change it")
    return "".join(("    " + ln) if ln.strip() else ln for ln in src.splitlines(keepends=True))


def insert_locals(src: str, lazy: set[str], where: str, lineno: int) -> str:
    """Each function in *src* (the statement, or a class's methods) that uses a name the lazy builder
    makes (Jinja2, the sandbox) gets ``NAME = _sandbox().NAME`` lines at the top of its body."""
    tree = parse(src, where)
    top = tree.body[0]
    funcs = [top] if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
        [n for n in top.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] if isinstance(top, ast.ClassDef) else []
    if not funcs:
        if code_names(top) & lazy:
            raise Refuse(f"{where}:{lineno}: a top-level statement uses Jinja2 in a way this script cannot "
                         "make lazy")
        return src
    at = offsets(src)
    edits = []
    for f in funcs:
        need = code_names(f) & lazy
        if not need:
            continue
        stores = {n.id for n in ast.walk(f) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
        globs = {g for n in ast.walk(f) if isinstance(n, (ast.Global, ast.Nonlocal)) for g in n.names}
        if need & (stores | globs):
            raise Refuse(f"{where}:{lineno}: {f.name} assigns {', '.join(sorted(need & (stores | globs)))}")
        body = f.body[1:] if is_docstring(f.body[0]) and len(f.body) > 1 else f.body
        first = body[0]
        if first.lineno == f.lineno:
            raise Refuse(f"{where}:{lineno}: {f.name} has its body on the def line")
        indent = " " * first.col_offset
        pos = at(first.lineno, 0)
        edits.append((pos, pos, "".join(f"{indent}{n} = _sandbox().{n}\n" for n in sorted(need))))
    return apply_edits(src, edits, where)


def join_chunks(pieces: list[tuple[int, int, str]], original: str, most: int) -> str:
    """Statements in their original order, separated as they were where they were neighbours (at most
    *most* blank lines), else by *most* blank lines."""
    out = ""
    for i, (s, e, src) in enumerate(pieces):
        if i:
            gap = original[pieces[i - 1][1]:s]
            blank = min(gap.count("\n"), most) if not gap.strip() else most
            out += "\n" * blank
        out += src.rstrip("\n") + "\n"
    return out


def lazy_builder(chunks: list[tuple[ast.stmt, int, int, str]], jinja_imports: list[str], exported: list[str],
                 where: str, original: str) -> str:
    body = join_chunks([(s, e, indent_block(src.rstrip("\n") + "\n", where, node.lineno))
                        for node, s, e, src in chunks], original, 1).rstrip("\n")
    return ('@functools.lru_cache(maxsize=None)\n'
            'def _sandbox():\n'
            '    """Jinja2 and the sandbox names are rendered in, built on the first render: importing this\n'
            '    module loads no Jinja2 (the orchestrator and the lab import it for the name checks alone)."""\n'
            + "".join(f"    {line}" for line in jinja_imports) + "\n"
            + body + "\n"
            + f"    return types.SimpleNamespace({', '.join(f'{n}={n}' for n in exported)})\n")


DOC_PARAGRAPH = {
    "names": "Filename templates (:func:`render_name`, :func:`check_template`, :func:`check_layout`) render in\n"
             "Jinja2's sandbox (``ImmutableSandboxedEnvironment`` with ``StrictUndefined``, so a typo in a template\n"
             "is an error at config load rather than an empty string in a file name). Jinja2 is imported on the\n"
             "first render: the orchestrator and the lab import this module for the name checks alone.",
    "records": "The record writers live here too: :class:`JsonArchiver` and :class:`ArrayArchiver` turn a record\n"
               "into bytes, :class:`BackgroundWriter` writes records on a thread with retries and a ``failed/``\n"
               "fallback, :func:`with_default_metadata` merges ``[archive] default_metadata``. The crash-safe\n"
               "writes under them are :mod:`beemond.core.fsio`'s, the record and sidecar names :mod:`beemond.spool`'s.",
}


def add_doc_paragraph(text: str, para: str, where: str) -> str:
    tree = parse(text, where)
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
        return text
    at = offsets(text)
    end = at(first.end_lineno, first.end_col_offset)
    quote = text[end - 3:end]
    if quote not in ('"""', "'''") or para.split("\n")[0] in text:
        return text
    body = text[:end - 3].rstrip()
    return body + "\n\n" + para + "\n" + quote + text[end:]


def infer_places(stmts: list[dict], places: dict[str, str], jinja: set[str], rel: str) -> None:
    """Give each top-level statement of archive.py its destination ("names" or "records"): from
    *places* by name, else by who uses it (a definition used by a template goes with the templates;
    one used only by the record writers with them), else by what it uses (Jinja2 or a template)."""
    for st in stmts:
        known = {places[n] for n in st["defines"] if n in places}
        if len(known) > 1:
            raise Refuse(f"{rel}:{st['node'].lineno}: one statement defines names for both homes")
        st["dest"] = known.pop() if known else None
    changed = True
    while changed:
        changed = False
        for st in stmts:
            if st["dest"]:
                continue
            users = {o["dest"] for o in stmts if o["dest"] and set(st["defines"]) & o["uses"]}
            used = {o["dest"] for o in stmts if o["dest"] and set(o["defines"]) & st["uses"]}
            dest = ("names" if "names" in users else "records" if users else
                    "names" if (st["uses"] & jinja or "names" in used) else "records" if used else None)
            if dest:
                st["dest"], changed = dest, True
    for st in stmts:
        if not st["dest"]:
            what = ", ".join(st["defines"]) or "a statement"
            raise Refuse(f"{rel}:{st['node'].lineno}: no home for {what} (nothing in archive.py uses it, it uses "
                         "nothing there); rerun with --place NAME=names or --place NAME=records")


def step_archive(t: Tree, places: dict[str, str]) -> dict[str, str]:
    """Dissolve archive.py; returns name -> home module for every name it offered."""
    rel = "beemond/archive.py"
    if not t.exists(rel):     # already dissolved: a late archive.X goes where that name is defined now
        homes = dict(KNOWN_HOMES)
        for trel, module in (("beemond/records.py", "beemond.records"), ("beemond/core/names.py", "beemond.core.names")):
            if t.exists(trel):
                for name in top_defs(parse(t.files[trel], trel)):
                    homes.setdefault(name, module)
        return homes
    text = t.files[rel]
    tree = parse(text, rel)
    at = offsets(text)
    homes: dict[str, str] = {}
    imports = top_imports(tree)
    jinja: set[str] = set()
    jinja_imports: list[str] = []
    for name, (node, a) in imports.items():
        target = import_target(node, a)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("beemond"):
            module = node.module
            if module in ("beemond.clock", "beemond.names", "beemond.journal", "beemond.notify"):
                module = "beemond.core." + module.split(".")[1]
            if module == "beemond.spool" and a.name in FSIO_NAMES:
                module = "beemond.core.fsio"
            homes[name] = module
        elif target.startswith("beemond"):
            raise Refuse(f"{rel}:{node.lineno}: import {target} in archive.py: unknown form")
        if target.split(".")[0] == "jinja2":
            jinja.add(name)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if import_target(node, a).split(".")[0] == "jinja2":
                    jinja_imports.append(import_line(node, a))
    defs = top_defs(tree)
    stmts = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if is_docstring(node) and node is tree.body[0]:
            continue        # the module docstring: its parts now live in names, records, fsio
        defines = [n for n, d in defs.items() if d is node]
        if defines == ["log"]:
            continue
        stmts.append({"node": node, "defines": defines, "uses": used_names(node)})
    infer_places(stmts, places, jinja, rel)
    for st in stmts:
        for n in st["defines"]:
            homes[n] = "beemond.core.names" if st["dest"] == "names" else "beemond.records"
    # The templates: what must run at import and touches Jinja2 goes into one lazy builder.
    names_stmts = [st for st in stmts if st["dest"] == "names"]
    lazy = set(jinja)
    builder: list[dict] = []
    changed = True
    while changed:
        changed = False
        for st in names_stmts:
            if st not in builder and import_time_names(st["node"]) & lazy:
                builder.append(st)
                lazy |= set(st["defines"])
                changed = True
    builder.sort(key=lambda st: st["node"].lineno)
    if "_sandbox" in defs or "_sandbox" in imports:
        raise Refuse(f"{rel}: already defines _sandbox")
    chunks: dict[str, list[tuple[int, int, str]]] = {"names": [], "records": []}
    need: dict[str, set[str]] = {"names": set(), "records": set()}
    outside_uses: set[str] = set()
    for st in names_stmts:
        if st not in builder:
            outside_uses |= code_names(st["node"]) & lazy
    exported = sorted(outside_uses)
    ann_jinja = set()
    for st in stmts:
        node = st["node"]
        s, e = chunk_text(text, at, node)
        src = text[s:e]
        if st["dest"] == "names":
            ann_jinja |= annotation_names(node) & jinja
            if annotation_names(node) & (lazy - jinja):
                raise Refuse(f"{rel}:{node.lineno}: an annotation names a class the lazy Jinja2 builder makes")
            if st in builder:
                if st is builder[0]:
                    parts = [(b["node"], *chunk_text(text, at, b["node"])) for b in builder]
                    chunks["names"].append((s, e, lazy_builder([(n, s0, e0, text[s0:e0]) for n, s0, e0 in parts],
                                                               jinja_imports, exported, rel, text)))
                    need["names"] |= {"functools", "types"}
                continue
            src = insert_locals(src, lazy, rel, node.lineno)
        chunks[st["dest"]].append((s, e, src))
    if ann_jinja:
        need["names"].add("TYPE_CHECKING jinja2")
    # What each chunk needs from archive's imports and definitions.
    targets = {"names": "beemond/core/names.py", "records": "beemond/records.py"}
    home_of = {"names": "beemond.core.names", "records": "beemond.records"}
    for dest, pieces in chunks.items():
        if not pieces:
            continue
        trel = targets[dest]
        if not t.exists(trel):
            raise Refuse(f"{trel} is missing")
        dest_text = t.files[trel]
        dest_tree = parse(dest_text, trel)
        dest_bound = set(top_defs(dest_tree)) | set(top_imports(dest_tree))
        for n in (set().union(*(st["defines"] for st in stmts if st["dest"] == dest)) & dest_bound):
            raise Refuse(f"{trel} already defines {n}, which archive.py defines too: merge by hand")
        joined = join_chunks(pieces, text, 2)
        used = code_names(parse(joined, rel)) | annotation_names(parse(joined, rel)) - jinja
        used -= jinja if dest == "names" else set()
        lines = [f"import {m}\n" for m in ("functools", "types") if m in need[dest] and m not in dest_bound]
        for name in sorted(used):
            if name == "log" and name in defs and name not in dest_bound:
                raise Refuse(f"{trel}: moved code logs but {trel} has no module logger `log`")
            if name in imports and name not in dest_bound:
                node, a = imports[name]
                module = homes.get(name)
                if module == home_of[dest]:
                    continue
                if module:
                    if module == "beemond.records" and dest == "names":
                        raise Refuse(f"{rel}: a template needs {name} from the record writers")
                    lines.append(f"from {module} import {alias_text(a)}\n")
                else:
                    lines.append(import_line(node, a))
            elif name in defs and name not in dest_bound and homes.get(name) not in (None, home_of[dest]):
                module = homes[name]
                if dest == "names" and module == "beemond.records":
                    raise Refuse(f"{rel}: a template needs {name} from the record writers")
                lines.append(f"from {module} import {name}\n")
        if "TYPE_CHECKING jinja2" in need[dest]:
            lines.append("from typing import TYPE_CHECKING\n")
        new_text = insert_imports(dest_text, lines, trel) if lines else dest_text
        title = "templates" if dest == "names" else "record writers"
        head = f"\n\n\n# {'-' * 90} {title}\n\n"
        if "TYPE_CHECKING jinja2" in need[dest] and "jinja2" not in dest_bound:
            head += "if TYPE_CHECKING:\n" + "".join(f"    {ln}" for ln in jinja_imports
                                                    if ast.parse(ln).body[0].names[0].name.split(".")[0] in ann_jinja
                                                    and " as " not in ln and ln.startswith("import jinja2\n")) + "\n\n"
        new_text = new_text.rstrip("\n") + head + joined
        new_text = add_doc_paragraph(new_text, DOC_PARAGRAPH[dest], trel)
        t.files[trel] = re.sub(r"\n{4,}", "\n\n\n", new_text)
        t.log.append(f"moved {len(pieces)} definitions from {rel} to {trel}")
    del t.files[rel]
    t.removed.append(rel)
    t.log.append(f"git rm {rel}")
    for k, v in KNOWN_HOMES.items():
        homes.setdefault(k, v)
    return homes


# ------------------------------------------------------------------------------------------ step 4: uses

def rewrite_module_uses(t: Tree, rel: str, text: str, module: str, moved: dict[str, str],
                        all_moved: bool) -> str:
    """Rewrite ``alias.X`` (alias bound by ``from beemond import <leaf>``) and ``from <module> import X``
    for the names in *moved* (name -> home module). With *all_moved* the module is gone: any other use
    of it is refused and its import removed."""
    tree = parse(text, rel)
    leaf = module.rsplit(".", 1)[1]
    parent = module.rsplit(".", 1)[0]
    up = parents(tree)
    at = offsets(text)
    bound = bound_names(tree)
    edits = []
    # `import beemond.archive` style.
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == module or a.name.startswith(module + "."):
                    if all_moved or any(f"{module}.{x}" in text for x in moved):
                        raise Refuse(f"{rel}:{node.lineno}: `import {a.name}`: rewrite it by hand to "
                                     f"`from {parent} import {leaf}`")
    # `from <module> import X` -> per home.
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == module:
            keep = [a for a in node.names if a.name not in moved]
            if all_moved and keep:
                raise Refuse(f"{rel}:{node.lineno}: imports {', '.join(a.name for a in keep)} from {module}, "
                             "which has no home")
            if len(keep) == len(node.names):
                continue
            s, e, indent, comment = stmt_span(text, at, node, rel)
            by_home: dict[str, list[str]] = {}
            own = rel_module(rel)
            for a in node.names:
                if a.name in moved and moved[a.name] != own:
                    by_home.setdefault(moved[a.name], []).append(alias_text(a))
            parts = [(module, format_from(module, [alias_text(a) for a in keep], indent, comment))] if keep else []
            for home, names in sorted(by_home.items()):
                parts.append((home, format_from(home, sorted(names, key=name_order), indent, "" if keep else comment)))
            out = "".join(line for _, line in sorted(parts))
            edits.append((s, e, out))
    # `from <parent> import <leaf>` bindings and their scopes.
    binders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == parent:
            for a in node.names:
                if a.name == leaf:
                    binders.append((node, a))
    if not binders:
        if edits:
            return apply_edits(text, edits, rel)
        return text
    aliases = {a.asname or a.name for _, a in binders}
    scopes = {}
    for node, a in binders:
        sc = scope_of(node, up)
        scopes.setdefault(id(sc), (sc, []))[1].append((node, a))
    def local_scope(node):     # class bodies do not shadow the module's names inside functions
        while node in up:
            node = up[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module, ast.ClassDef)):
                return node
        return node
    def rewritten(n):          # a use this function would change
        return all_moved or (isinstance(up.get(n), ast.Attribute) and up[n].attr in moved)
    use_scopes = {id(scope_of(n, up)) for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in aliases
                  and isinstance(n.ctx, ast.Load) and rewritten(n)}
    for name in aliases:
        others = [n for n in bound.get(name, []) if not isinstance(n, (ast.ImportFrom, ast.Import))
                  and not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and id(local_scope(n)) in use_scopes]
        others += [n for n in bound.get(name, []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                   and id(local_scope(n)) in use_scopes]
        if others:
            raise Refuse(f"{rel}:{getattr(others[0], 'lineno', '?')}: `{name}` is both the module {module} and "
                         "a local name here")
    # Each use, to the nearest scope that binds it.
    uses: dict[int, list[ast.Attribute]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in aliases and isinstance(node.ctx, ast.Load) and rewritten(node):
            parent_node = up.get(node)
            is_attr = isinstance(parent_node, ast.Attribute) and parent_node.value is node
            sc = scope_of(node, up)
            while id(sc) not in scopes and sc in up:
                sc = scope_of(sc, up)
            if id(sc) not in scopes:
                raise Refuse(f"{rel}:{node.lineno}: `{node.id}` used where no import binds it")
            if not is_attr:
                if all_moved:
                    raise Refuse(f"{rel}:{node.lineno}: `{node.id}` used other than as `{node.id}.X` "
                                 "(monkeypatch? passed as a value?): rewrite it by hand")
                continue
            if parent_node.attr not in moved:
                if all_moved:
                    raise Refuse(f"{rel}:{node.lineno}: {node.id}.{parent_node.attr}: no known home")
                continue
            uses.setdefault(id(sc), []).append(parent_node)
    own = rel_module(rel)
    top_bindings = {}       # bare name -> dotted target, module level
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                top_bindings[a.asname or a.name.split(".")[0]] = import_target(node, a)
    binder_ids = {id(node) for node, _ in binders}
    grow: dict[int, tuple[ast.ImportFrom, list[str]]] = {}     # existing import -> names it gains
    shifted: set[int] = set()
    for key, (sc, stmts) in scopes.items():
        attrs = uses.get(key, [])
        scope_bindings = dict(top_bindings)
        scope_froms = {}     # module -> a one-line `from module import ...` of this very scope
        for node in (ast.walk(sc) if not isinstance(sc, ast.Module) else sc.body):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and scope_of(node, up) is sc:
                for a in node.names:
                    scope_bindings[a.asname or a.name.split(".")[0]] = import_target(node, a)
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.lineno == node.end_lineno \
                        and id(node) not in binder_ids:
                    scope_froms.setdefault(node.module, node)
        need: dict[str, list[str]] = {}      # from-module -> names to import in this scope
        for attr in attrs:
            home = moved[attr.attr]
            sym = attr.attr
            short = SHORT.get(home, home.rsplit(".", 1)[1])
            alias = next((b for b, tg in scope_bindings.items() if tg == home), None)
            if home == own or scope_bindings.get(sym) == f"{home}.{sym}":
                repl = sym
            elif alias is not None:
                repl = f"{alias}.{sym}"
            elif home in scope_froms and not bound.get(sym):
                repl = sym
                need.setdefault(home, []).append(sym)
            elif short not in bound:
                repl = f"{short}.{sym}"
                need.setdefault(home.rsplit(".", 1)[0], []).append(short)
            else:
                clash = [n for n in bound.get(sym, []) if not (isinstance(n, ast.ImportFrom) and n.module == home)]
                if clash:
                    raise Refuse(f"{rel}:{attr.lineno}: cannot import {home} as `{short}` nor {sym} bare "
                                 "(both names are taken here)")
                repl = sym
                need.setdefault(home, []).append(sym)
            a0, b0 = at(attr.lineno, attr.col_offset), at(attr.end_lineno, attr.end_col_offset)
            edits.append((a0, b0, repl))
            shift_continuations(text, at, up, attr, len(repl) - (b0 - a0), edits, shifted)
        remaining = [n for n in ast.walk(sc) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                     and n.value.id in aliases and n.attr not in moved]
        for node, a in stmts:
            s, e, indent, comment = stmt_span(text, at, node, rel)
            names = [alias_text(x) for x in node.names if not (x is a and not remaining)]
            add = []
            for mod, lst in sorted(need.items()):
                lst = sorted(set(lst), key=name_order)
                if mod == parent:
                    names += [x for x in lst if x not in names]
                elif mod in scope_froms:
                    host = scope_froms[mod]
                    grow.setdefault(id(host), (host, []))[1].extend(lst)
                else:
                    add.append(format_from(mod, lst, indent))
            head = format_from(parent, sorted(names, key=name_order), indent, comment) if names else ""
            if not names and comment and add:      # keep a `# noqa: E402` and the like
                add[0] = add[0].rstrip("\n") + "  " + comment + "\n"
            edits.append((s, e, head + "".join(add)))
            need = {}    # added once per scope
    for host, extra in grow.values():
        s, e, indent, comment = stmt_span(text, at, host, rel)
        have = [alias_text(x) for x in host.names]
        edits.append((s, e, format_from(host.module, sorted(set(have + extra), key=name_order), indent, comment)))
    return apply_edits(text, edits, rel)


def shift_continuations(text: str, at, up, attr: ast.Attribute, delta: int, edits: list, shifted: set) -> None:
    """Keep a call's continuation lines aligned with its opening parenthesis when the callee's name
    changes length (``archive.write_record(a,`` / ``         b)``)."""
    call = up.get(attr)
    if not delta or not isinstance(call, ast.Call) or call.func is not attr or call.end_lineno == call.lineno:
        return
    lines = text.splitlines(keepends=True)
    first = lines[attr.end_lineno - 1]
    paren = len(first.encode()[:attr.end_col_offset].decode())
    if first[paren:paren + 1] != "(":
        return
    for ln in range(attr.end_lineno + 1, call.end_lineno + 1):
        line = lines[ln - 1]
        indent = len(line) - len(line.lstrip(" "))
        if indent == paren + 1 and ln not in shifted and indent + delta > 0:
            shifted.add(ln)
            start = at(ln, 0)
            edits.append((start, start + indent, " " * (indent + delta)))


def rel_module(rel: str) -> str:
    p = Path(rel)
    if p.parts[0] != "beemond":
        return ""
    parts = p.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FROM_BEEMOND = re.compile(r"(?P<indent>^[ \t]*)?from beemond import (?P<names>\w+(?: as \w+)?(?:, *\w+(?: as \w+)?)*)"
                          r"(?P<end>;[ ]?)?", re.M)


def split_core_from_imports(rel: str, text: str) -> str:
    """``from beemond import clock, config`` (code, or text in a string) -> with clock from beemond.core."""
    tree = parse(text, rel) if rel.endswith(".py") else None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "beemond" and node.lineno != node.end_lineno \
                    and any(a.name in CORE_MODULES for a in node.names):
                raise Refuse(f"{rel}:{node.lineno}: multi-line `from beemond import (...)` with a core module")
            if isinstance(node, ast.ImportFrom) and node.level and any(
                    a.name in CORE_MODULES or (node.module or "").split(".")[0] in CORE_MODULES for a in node.names):
                raise Refuse(f"{rel}:{node.lineno}: relative import of a core module: rewrite it by hand")

    def repl(m: re.Match) -> str:
        items = [x.strip() for x in m["names"].split(",")]
        core = [x for x in items if x.split(" as ")[0] in CORE_MODULES]
        if not core:
            return m[0]
        rest = [x for x in items if x not in core]
        at_line_start = m["indent"] is not None and m["end"] is None
        indent = m["indent"] or ""
        if at_line_start:
            out = (f"from beemond import {', '.join(rest)}\n{indent}" if rest else "") + \
                f"from beemond.core import {', '.join(core)}"
            return indent + out
        out = (f"from beemond import {', '.join(rest)}; " if rest else "") + f"from beemond.core import {', '.join(core)}"
        return indent + out + (m["end"] or "")

    return FROM_BEEMOND.sub(repl, text)


def core_text_rules(text: str) -> str:
    core = "|".join(CORE_MODULES)
    text = re.sub(rf"(?<![\w.])beemond\.({core})(?!\w)", r"beemond.core.\1", text)
    text = re.sub(rf"(?<![\w.])beemond/({core})\.py\b", r"beemond/core/\1.py", text)
    return re.sub(rf"\"beemond\"(\s*/\s*)\"({core})\.py\"", r'"beemond"\1"core"\1"\2.py"', text)


# Mentions of the whole of archive.py whose new home is not the record writers.
PHRASES = {

    '"""beemond.archive: safe record names from sandboxed templates, crash-safe writes, temp clean-up."""':
        '"""beemond.core.names and beemond.core.fsio: safe record names from sandboxed templates, crash-safe '
        'writes,\ntemp clean-up."""',
}


def archive_text_rules(rel: str, text: str, homes: dict[str, str]) -> str:

    def archive_sym(m: re.Match) -> str:
        sym = m[2]
        if sym not in homes:
            raise Refuse(f"{rel}: `beemond.archive.{sym}` has no known home")
        return f"{homes[sym]}.{m[1] or ''}{sym}"
    # (a reference may be broken across lines in a docstring: ``beemond.archive.`` / ``check_template``)
    text = re.sub(r"(?<![\w.])beemond\.archive\.(\n[ \t]*)?(\w+)", archive_sym, text)
    for old, new in PHRASES.items():
        text = text.replace(old, new)
    if rel == "pyproject.toml":
        # import-linter layers: archive.py's parts are already listed (beemond.records, beemond.core.names)
        text = re.sub(r'\s*[:|]\s*beemond\.archive(?=[\s"])', "", text)
        text = re.sub(r'(?<=")beemond\.archive\s*[:|]\s*', "", text)
        if "beemond.core.fsio" not in text:   # the crash-safe files sit beside the clock they came down with
            text = re.sub(r"(beemond\.core\.clock)(\s*)([:|])(\s*)", r"\1\2\3\4beemond.core.fsio\2\3\4", text, count=1)
    text = re.sub(r"^.*(?<![\w.])beemond\.archive(?![\w.]).*$",
                  lambda m: re.sub(r"(?<![\w.])beemond\.archive(?![\w.])",
                                   "beemond.core.names" if "template" in m[0].lower() else "beemond.records", m[0]),
                  text, flags=re.M)
    # A path to the whole of archive.py: the templates' home where the line speaks of templates.
    text = re.sub(r"^.*(?<![\w./])beemond/archive\.py\b.*$",
                  lambda m: re.sub(r"(?<![\w./])beemond/archive\.py\b",
                                   "beemond/core/names.py" if "template" in m[0].lower() else "beemond/records.py", m[0]),
                  text, flags=re.M)
    fs = "|".join(FSIO_PUBLIC)
    text = re.sub(rf"(?<![\w.])beemond\.spool\.({fs})\b", r"beemond.core.fsio.\1", text)
    if rel.endswith(".py"):
        # Docstrings and comments that say archive.X (code uses were rewritten already).
        syms = "|".join(sorted((re.escape(k) for k in homes), key=len, reverse=True))
        text = re.sub(rf"(?<![\w.])archive\.({syms})\b",
                      lambda m: f"{SHORT.get(homes[m[1]], homes[m[1]])}.{m[1]}", text)
    return text


def preload_rule(rel: str, text: str) -> str:
    """The forkserver preloaded beemond.archive to share Jinja2's pages among the workers; Jinja2 is
    now imported on first render, so it is preloaded by name."""
    if "PRELOAD_ALWAYS" not in text or '"beemond.records"' not in text or '"jinja2' in text:
        return text
    text = re.sub(r"(PRELOAD_ALWAYS = \([^)]*?)\)", r'\1, "jinja2.sandbox")', text, count=1)
    text = text.replace("(archive brings Jinja2)", "(and Jinja2's sandbox)")
    return text


FROM_LINE = re.compile(r"^(?P<indent>[ \t]*)from (?P<module>[\w.]+) import (?P<names>\w+(?: as \w+)?(?:, \w+(?: as \w+)?)*)$")


def merge_module_imports(text: str, where: str) -> str:
    """Top-level one-line ``from m import a`` and, further down, ``from m import b`` -> one line (the
    rewrite can make two lines name the same module, e.g. ``beemond.clock`` and ``beemond.core.clock``)."""
    tree = parse(text, where)
    at = offsets(text)
    groups: dict[str, list[ast.ImportFrom]] = {}
    for n in tree.body:
        if isinstance(n, ast.ImportFrom) and n.level == 0 and n.lineno == n.end_lineno and n.module != "__future__":
            groups.setdefault(n.module, []).append(n)
    edits = []
    for module, nodes in groups.items():
        if len(nodes) < 2:
            continue
        spans = [stmt_span(text, at, n, where) for n in nodes]
        if any(comment for *_, comment in spans[1:]):
            continue
        names = []
        for n in nodes:
            names += [alias_text(a) for a in n.names if alias_text(a) not in names]
        line = format_from(module, sorted(names, key=name_order), spans[0][2], spans[0][3])
        if "\n" in line.rstrip("\n"):
            continue
        edits.append((spans[0][0], spans[0][1], line))
        edits += [(s, e, "") for s, e, *_ in spans[1:]]
    return apply_edits(text, edits, where)


def merge_adjacent_imports(text: str) -> str:
    """``from m import a`` right above ``from m import b`` (same indentation) -> ``from m import a, b``."""
    out: list[str] = []
    for line in text.split("\n"):
        m, prev = FROM_LINE.match(line), FROM_LINE.match(out[-1]) if out else None
        if m and prev and (m["indent"], m["module"]) == (prev["indent"], prev["module"]):
            names = prev["names"].split(", ") + [n for n in m["names"].split(", ") if n not in prev["names"].split(", ")]
            out[-1] = format_from(m["module"], sorted(names, key=name_order), m["indent"]).rstrip("\n")
            if "\n" in out[-1]:        # too long for one line: leave both as they were
                out[-1] = prev[0]
                out.append(line)
            continue
        out.append(line)
    return "\n".join(out)


def allowlist_rule(rel: str, text: str) -> str:
    """A literal list of neutral modules a process may load (``{"beemond.core.clock", "beemond.spool",
    ...}`` in a sys.modules check) now also sees the package beemond.core and the crash-safe writes
    that came out of the spool, beemond.core.fsio."""
    if '"beemond.core.clock"' not in text or '"beemond.spool"' not in text:
        return text
    tree = parse(text, rel)
    at = offsets(text)
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            consts = {e.value: e for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if {"beemond.core.clock", "beemond.spool"} <= set(consts) and "beemond.core.fsio" not in consts:
                e = consts["beemond.core.clock"]
                pos = at(e.end_lineno, e.end_col_offset)
                extra = [m for m in ("beemond.core", "beemond.core.fsio") if m not in consts]
                edits.append((pos, pos, "".join(f', "{m}"' for m in extra)))
    return apply_edits(text, edits, rel)


def step_uses(t: Tree, homes: dict[str, str]) -> None:
    archive_gone = not t.exists("beemond/archive.py")
    fsio_moved = {n: "beemond.core.fsio" for n in FSIO_PUBLIC} if t.exists("beemond/core/fsio.py") else {}
    for rel in list(t.files):
        text = core_text_rules(split_core_from_imports(rel, t.files[rel]))
        if rel.endswith(".py"):
            if archive_gone:
                text = rewrite_module_uses(t, rel, text, "beemond.archive", homes, all_moved=True)
            if fsio_moved and rel != "beemond/core/fsio.py":
                text = rewrite_module_uses(t, rel, text, "beemond.spool", fsio_moved, all_moved=False)
        text = archive_text_rules(rel, text, homes)
        text = preload_rule(rel, text)
        if rel.endswith(".py"):
            text = allowlist_rule(rel, text)
        if rel.endswith(".py") and text != t.files[rel]:
            text = merge_module_imports(merge_adjacent_imports(text), rel)
        t.files[rel] = text


def step_meta_suffix(t: Tree) -> None:
    """core/names refuses rendered names that end in the sidecar suffix; importing it from the spool
    would make beemond.core and beemond.spool import each other (import-linter's acyclic contract).
    So the constant moves down into core/names and the spool imports it from there."""
    names_rel, spool_rel = "beemond/core/names.py", "beemond/spool.py"
    text = t.files[names_rel]
    tree = parse(text, names_rel)
    at = offsets(text)
    froms = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "beemond.spool"]
    if not froms:
        return
    for n in froms:
        other = [a.name for a in n.names if a.name != "META_SUFFIX"]
        if other or n.lineno != n.end_lineno:
            raise Refuse(f"{names_rel}:{n.lineno}: imports {', '.join(other) or 'META_SUFFIX over lines'} from the "
                         "spool: core must not import the spool (acyclic contract); move it by hand")
    stext = t.files[spool_rel]
    stree = parse(stext, spool_rel)
    sdefs = top_defs(stree)
    node = sdefs.get("META_SUFFIX")
    if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and len(node.targets) == 1):
        raise Refuse(f"{spool_rel}: META_SUFFIX is not a plain constant there; move it by hand")
    sat = offsets(stext)
    s0, e0 = chunk_text(stext, sat, node)
    definition = stext[s0:e0]
    stext = apply_edits(stext, [(s0, e0, "")], spool_rel)
    t.files[spool_rel] = insert_imports(stext, ["from beemond.core.names import META_SUFFIX\n"], spool_rel)
    edits = [(*stmt_span(text, at, n, names_rel)[:2], "") for n in froms]
    first = next(n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom)) and not is_docstring(n))
    pos = at(first.lineno, 0)
    while pos > 0 and text[:pos].rstrip("\n").splitlines()[-1].lstrip().startswith("#"):
        pos = text.rfind("\n", 0, len(text[:pos].rstrip("\n"))) + 1
    comment = "# A record's metadata sidecar is NAME + META_SUFFIX (beemond.spool); no rendered name may end so.\n"
    edits.append((pos, pos, (comment + definition.split("\n", 1)[0].strip() + "\n" if definition.count("\n") == 1
                             and not definition.lstrip().startswith("#") else definition) + "\n"))
    t.files[names_rel] = re.sub(r"but\s+the\s+spool's\s+own\s+file-name\s+marks", "but the file-name mark of beemond.core.fsio",
                                apply_edits(text, edits, names_rel))
    t.log.append(f"META_SUFFIX moved from {spool_rel} to {names_rel} (the spool imports it)")


# ------------------------------------------------------------------------------------------ checks

def check(t: Tree) -> None:
    problems = []
    core = "|".join(CORE_MODULES)
    for rel, text in t.files.items():
        if rel.endswith(".py"):
            try:
                tree = ast.parse(text, rel)
            except SyntaxError as e:
                problems.append(f"{rel}:{e.lineno}: does not parse after the rewrite ({e.msg})")
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    if node.module == "beemond" and any(a.name in (*CORE_MODULES, "archive") for a in node.names):
                        problems.append(f"{rel}:{node.lineno}: still imports a moved module from beemond")
                    if node.module in {f"beemond.{m}" for m in (*CORE_MODULES, "archive")}:
                        problems.append(f"{rel}:{node.lineno}: still imports from {node.module}")
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(rf"from beemond import [\w, ]*\b(archive|{core})\b", line):
                problems.append(f"{rel}:{i}: still imports a moved module: {line.strip()[:100]}")
            if re.search(rf"(?<![\w.])beemond[./](archive|{core})\b(?!/)", line):
                problems.append(f"{rel}:{i}: still names a moved module: {line.strip()[:100]}")
    for m in (*CORE_MODULES, "archive"):
        if f"beemond/{m}.py" in t.files:
            problems.append(f"beemond/{m}.py still exists")
    if problems:
        raise Refuse("the rewrite left references it does not understand:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="report what would change; change nothing")
    ap.add_argument("--allow-dirty", action="store_true", help="run on a work tree with uncommitted changes")
    ap.add_argument("--place", action="append", default=[], metavar="NAME=names|records",
                    help="home of an archive.py definition this script does not know")
    args = ap.parse_args(argv)
    root = Path(git("rev-parse", "--show-toplevel", root=Path.cwd()).strip())
    places = dict(ARCHIVE_PLACES)
    for p in args.place:
        name, _, dest = p.partition("=")
        if dest not in ("names", "records"):
            ap.error(f"--place {p}: the home is names or records")
        places[name] = dest
    if not args.check and not args.allow_dirty and git("status", "--porcelain", "--untracked-files=no", root=root).strip():
        print("restructure_core: the work tree has uncommitted changes; commit them or pass --allow-dirty",
              file=sys.stderr)
        return 2
    t = Tree(root)
    try:
        step_core(t)
        step_fsio(t)
        homes = step_archive(t, places)
        step_uses(t, homes)
        step_meta_suffix(t)
        check(t)
    except Refuse as e:
        print(f"restructure_core: refused, nothing changed: {e}", file=sys.stderr)
        return 3
    changed = sorted(rel for rel, text in t.files.items() if t.original.get(rel) != text
                     and rel not in {new for _, new in t.moves})
    moved_changed = [new for old, new in t.moves if t.files[new] != t.original[old]]
    for line in t.log:
        print(line)
    for rel in changed + moved_changed:
        print(f"rewrote {rel}")
    if not (changed or moved_changed or t.moves or t.removed):
        print("restructure_core: nothing to do (already applied)")
        return 0
    if args.check:
        return 1
    (root / "beemond/core").mkdir(exist_ok=True)
    for old, new in t.moves:
        git("mv", old, new, root=root)
    for rel in t.removed:
        git("rm", "-q", rel, root=root)
    for rel, text in t.files.items():
        if t.original.get(rel) != text or rel in {new for _, new in t.moves}:
            (root / rel).write_text(text)
    git("add", "--", *sorted(set(t.files) - set(t.original) | set(changed) | set(moved_changed)
                               | {new for _, new in t.moves}), root=root)
    print(f"restructure_core: done ({len(t.moves)} moved, {len(t.removed)} removed, "
          f"{len(changed) + len(moved_changed)} rewritten); review with `git diff --cached -M`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
