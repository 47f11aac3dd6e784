"""The bundle format as a reader sees it: manifest, tar stream, and a bounded, verified extraction.

Shared by the device (the aggregator seals with :data:`FORMAT` and :data:`MANIFEST`) and the lab
(``beemond ingest``, ``beemond decrypt``), so the lab never imports a device-side worker.

A bundle ``NAME.tar.age`` is an age-encrypted, uncompressed POSIX (pax) tar of records
``<sensor>/<record name>`` followed by ``manifest.json``::

    {"format": "beemond-bundle/1", "host", "software", "created", "name", "group", "start", "end",
     "signing_key", "records": [{"path", "sensor", "start", "end", "size", "sha256", "metadata"}, ...]}

beside its detached signature ``NAME.tar.age.sig`` (see :mod:`beemond.bundle.crypto`).

:func:`read_bundle` reads the file **once**: the same bytes feed the signature's SHA-512 and age's
decryption, so a file swapped or altered between a check and a use cannot pass. Nothing it writes is
trusted until the end: members go to a private work directory, and only after the signature verified
over exactly the bytes that were decrypted, and every member matched the manifest, does the caller
publish them.

A hostile bundle cannot make it write or hold more than it should (:class:`Limits`). The manifest
comes last, so before it is read no declared size is known; instead every member is bounded by what
an honest bundle can hold: the tar is uncompressed and age does not compress, so a member's bytes are
bytes of the ciphertext. A member whose header claims more than the ciphertext has left, a sparse
member (the only way a small tar holds a large file), one over ``max_member_bytes``, or a running total
over ``max_total_bytes`` is refused from its header, before a byte of it is written. The manifest is
read into memory only up to ``max_manifest_bytes``; member names deeper than ``max_path_depth`` or longer
than ``max_path_bytes`` are refused before any directory is made. Every refusal is a
:class:`BundleError` with a short ``reason`` and a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from beemond.core import names
from beemond.errors import FormatError
from beemond.core.fsio import atomic_writer

FORMAT = "beemond-bundle/1"
MANIFEST = "manifest.json"
CHUNK = 1 << 20


class BundleError(FormatError):
    """A bundle that fails verification. ``reason``: ``manifest`` (bad manifest, missing or extra member,
    hash mismatch), ``signer`` (the manifest names another key than the one that signed), ``unsafe`` (a member name or type no bundle has), ``oversize`` (over a
    :class:`Limits` bound or the ciphertext's own size)."""

    def __init__(self, message: str, reason: str = "manifest"):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Limits:
    """Bounds on what reading one bundle may write or hold (bytes, except the path depth).

    ``max_bundle_bytes``: the ciphertext itself (checked from ``fstat`` before reading);
    ``max_member_bytes``: one record; ``max_total_bytes``: all records of a bundle together (each also
    bounded by the ciphertext's size); ``max_manifest_bytes``: ``manifest.json``, held in memory;
    ``max_path_depth``/``max_path_bytes``: a member name's components and length.

    Defaults: 1 GiB (ten times the device's default ``[bundle] max_bytes``). Python's tar reader holds a
    pax extended header in memory whole, so a hostile bundle can make the reader hold up to its own size:
    ``max_bundle_bytes`` bounds that too.
    """

    max_bundle_bytes: int = 1 << 30
    max_member_bytes: int = 1 << 30
    max_total_bytes: int = 1 << 30
    max_manifest_bytes: int = 16 << 20
    max_path_depth: int = 8
    max_path_bytes: int = 1024


DEFAULT_LIMITS = Limits()


@dataclass
class Verified:
    """What :func:`read_bundle` found: the manifest, the member names written under the work directory
    (relative POSIX paths), the ciphertext's size in bytes and SHA-512 (hex), and, when a signature was
    checked, the signer's fingerprint and label."""

    manifest: dict
    members: list[str]
    size: int
    digest: str
    signer: str | None = None
    label: str | None = None


class _HashingReader:
    """``read(n)`` from *raw*, feeding the same bytes to *hash* and counting them."""

    def __init__(self, raw, hash_name: str):
        self.raw, self.hash, self.size = raw, hashlib.new(hash_name), 0

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n if n is not None and n >= 0 else CHUNK)
        self.hash.update(b)
        self.size += len(b)
        return b

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def read_bundle(bundle: str | os.PathLike, identities, work: str | os.PathLike, trusted: dict | None = None,
                limits: Limits = DEFAULT_LIMITS, signature: str | os.PathLike | None = None) -> Verified:
    """Read *bundle* once: hash it (for its signature, when *trusted* is given), decrypt it and unpack
    its members into the existing, private directory *work*, within *limits*; then verify the signature
    over exactly those bytes and every member against the manifest (size, SHA-256, none missing, none
    extra, and a manifest ``signing_key`` naming the key that signed).

    Raises :class:`crypto.SignatureError` (checked first: a tampered file is reported as such, not as
    the decryption error it also causes), :class:`crypto.DecryptError`, :class:`BundleError`, ``OSError``.
    On any exception *work* may hold partial members: the caller removes it and publishes nothing.
    """
    from beemond.bundle import crypto  # here: a module that needs only the names and bounds loads no pyrage

    bundle = Path(bundle)
    sig = None
    if trusted is not None:
        sig = crypto.read_signature(Path(signature) if signature else bundle.with_name(bundle.name + crypto.SIG_SUFFIX),
                                    trusted)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; a regular file ignores it.
    with open(os.open(bundle, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # a device or FIFO never ends (/dev/zero) or never starts
            raise BundleError(f"{bundle.name} is not a regular file", "unsafe")
        size = st.st_size
        if sig is not None and sig.claimed is not None and size < sig.claimed:
            raise crypto.SignatureError("truncated", f"truncated: {size} of the {sig.claimed} bytes the device signed")
        if size > limits.max_bundle_bytes:
            raise BundleError(f"the bundle is {size} bytes, over the {limits.max_bundle_bytes}-byte limit", "oversize")
        src = _HashingReader(f, sig.hash_name if sig is not None else crypto.SIG_HASH)
        error: BaseException | None = None
        try:
            manifest, sizes = _unpack(src, identities, Path(work), min(size, limits.max_total_bytes), limits)
        except (crypto.DecryptError, BundleError) as e:
            error = e
        src.drain()  # the whole file goes through the hash, whatever stopped the unpacking
    if sig is not None:
        sig.check(src.hash.digest(), src.size)  # raises SignatureError before any other verdict
    if error is not None:
        raise error
    _check_manifest(manifest, sizes)
    if sig is not None and manifest.get("signing_key") != sig.fingerprint:
        raise BundleError(f"the manifest names signing key {manifest.get('signing_key')!r} but the bundle is "
                          f"signed by {sig.fingerprint}", "signer")
    return Verified(manifest, list(sizes), src.size, src.hash.hexdigest(),
                    sig.fingerprint if sig else None, sig.label if sig else None)


def extract_bundle(bundle: str | os.PathLike, identities, out_dir: str | os.PathLike, check=None,
                   trusted: dict | None = None, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Decrypt *bundle*, check it against its manifest (and its signature with *trusted*), and move its
    records into *out_dir* with ``manifest.json`` beside them.

    Members are unpacked into a private directory inside *out_dir* first (:func:`read_bundle`); only a
    bundle that passed every check, and ``check(manifest)`` (optional; it raises :class:`BundleError`
    to refuse), is moved into place. Returns the manifest. Raises what :func:`read_bundle` raises.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".beemond-extract-", dir=out_dir))
    try:
        got = read_bundle(bundle, identities, work, trusted, limits)
        if check is not None:
            check(got.manifest)
        for rel in got.members:
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(work / rel, dest)
        archive_manifest = json.dumps(got.manifest, indent=1, sort_keys=True).encode()
        with atomic_writer(out_dir / MANIFEST, "wb") as mf:
            mf.write(archive_manifest)
        return got.manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _member_path(name: str, limits: Limits) -> str:
    # Checked on the raw string before any Path is built: a 2,000-level name would otherwise recurse
    # in mkdir(parents=True) until RecursionError.
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes or name.count("/") >= limits.max_path_depth:
        raise BundleError(f"member name {name[:60]!r}... is deeper or longer than any record's "
                          f"(limits {limits.max_path_depth} levels, {limits.max_path_bytes} bytes)", "unsafe")
    try:
        return names.safe_relative(name)
    except names.TemplateError as e:
        raise BundleError(f"unsafe member name: {e}", "unsafe") from None


def _unpack(src: _HashingReader, identities, work: Path, budget: int, limits: Limits):
    """Decrypt *src* on a thread into a pipe, read the tar from it; members into *work*. Returns
    (manifest, {member: (size, sha256)})."""
    from beemond.bundle import crypto

    r, w = os.pipe()
    reader = os.fdopen(r, "rb", buffering=CHUNK)
    writer = os.fdopen(w, "wb", buffering=0)
    failure: list[BaseException] = []

    def decrypt():
        try:
            crypto.decrypt_stream(src, writer, identities)
        except BrokenPipeError:
            pass  # the tar reader stopped first; its error is the one to report
        except BaseException as e:
            failure.append(e)
        finally:
            try:
                writer.close()
            except OSError:
                pass

    t = threading.Thread(target=decrypt, name="decrypt", daemon=True)
    t.start()
    hashes: dict[str, tuple[int, str]] = {}
    dirs: set[str] = set()
    manifest = None
    written = 0
    tar_error: BaseException | None = None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if manifest is not None:
                    raise BundleError(f"member {member.name[:60]!r} after the manifest", "unsafe")
                if member.issparse() or not member.isfile():
                    raise BundleError(f"unexpected member type of {member.name[:60]!r} (only plain files)", "unsafe")
                if member.name == MANIFEST:
                    if member.size > limits.max_manifest_bytes:
                        raise BundleError(f"manifest.json of {member.size} bytes is over the "
                                          f"{limits.max_manifest_bytes}-byte limit", "oversize")
                    try:
                        manifest = json.loads(tar.extractfile(member).read(limits.max_manifest_bytes))
                    except (ValueError, RecursionError) as e:
                        raise BundleError(f"manifest.json is not JSON: {str(e)[:80]}") from None
                    continue
                rel = _member_path(member.name, limits)
                if rel in hashes:
                    raise BundleError(f"duplicate member {rel}")
                parents = [str(p) for p in PurePosixPath(rel).parents][:-1]
                if rel in dirs or any(p in hashes for p in parents):
                    # refused here, or the mkdir below fails like a full disk would (not the bundle's fault)
                    raise BundleError(f"member {rel} is both a file and a directory in the bundle", "unsafe")
                dirs.update(parents)
                if member.size > limits.max_member_bytes or written + member.size > budget:
                    raise BundleError(f"member {rel} claims {member.size} bytes: more than the bundle can hold "
                                      f"({budget - written} left of {budget}; limit {limits.max_member_bytes} each)",
                                      "oversize")
                written += member.size
                dest = work / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                data = tar.extractfile(member)
                with open(dest, "wb") as out:
                    while chunk := data.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                hashes[rel] = (member.size, h.hexdigest())
        # Drain: the age stream must be read to its authenticated end, or truncation goes unseen.
        while reader.read(CHUNK):
            pass
    except (BundleError, tarfile.TarError, ValueError, EOFError, RecursionError) as e:
        tar_error = e
    except OSError as e:  # the lab's own disk (ENOSPC, EIO): not the bundle's fault
        tar_error = e
    finally:
        reader.close()
        t.join()
    if failure:  # a decryption failure explains any tar error that followed from it
        raise failure[0]
    if isinstance(tar_error, (BundleError, OSError)) and not isinstance(tar_error, tarfile.TarError):
        raise tar_error
    if tar_error is not None:
        raise BundleError(f"not a readable tar: {str(tar_error)[:120]}") from None
    return manifest, hashes


def _check_manifest(manifest, hashes: dict[str, tuple[int, str]]) -> None:
    if manifest is None:
        raise BundleError("no manifest.json in the bundle")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"unknown bundle format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    records = manifest.get("records")
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("size"), int)
            and isinstance(r.get("sha256"), str) and isinstance(r.get("metadata", {}), dict) for r in records):
        raise BundleError("manifest.json: records must be a list of {path, size, sha256, ...}")
    if not isinstance(manifest.get("host"), str):
        raise BundleError("manifest.json: no host")
    listed = {rec["path"]: (rec["size"], rec["sha256"]) for rec in records}
    if len(listed) != len(records):  # the second of a pair would be missing when moved into place
        raise BundleError("manifest.json lists a record twice")
    for rel, (size, digest) in hashes.items():
        if rel not in listed:
            raise BundleError(f"{rel}: in the bundle but not in the manifest")
        if listed[rel] != (size, digest):
            raise BundleError(f"{rel}: sha256 {digest} size {size} does not match the manifest "
                              f"(sha256 {listed[rel][1]} size {listed[rel][0]})")
    missing = set(listed) - set(hashes)
    if missing:
        raise BundleError(f"{sorted(missing)[0]}: listed in the manifest but missing from the bundle")
