"""age encryption (pyrage): recipients, identities, key generation, streaming encrypt/decrypt.

The device holds only the lab's public keys (recipients); the private key (identity) stays in the
lab. Files are standard age v1 (https://age-encryption.org/v1): the stock ``age`` CLI decrypts them
(``age -d -i identity.txt BUNDLE > bundle.tar``), and ``age-keygen`` identity files work here.

Recipients in config are ``age1...`` X25519 public keys, ``ssh-ed25519``/``ssh-rsa`` public keys, or
paths of recipients files in age's format (one per line, ``#`` comments).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pyrage
from beemond.errors import FormatError, KeyMaterialError


class RecipientError(KeyMaterialError):
    """A recipient that is not an age or SSH public key, or an unreadable recipients file."""


class DecryptError(FormatError):
    """Not decryptable: no matching identity, or the ciphertext is damaged or truncated."""


class IdentityError(KeyMaterialError):
    """An identity file with no usable age secret key."""


def parse_recipient(text: str):
    text = text.strip()
    try:
        if text.startswith("age1"):
            return pyrage.x25519.Recipient.from_str(text)
        if text.startswith(("ssh-ed25519 ", "ssh-rsa ")):
            return pyrage.ssh.Recipient.from_str(text)
    except Exception as e:  # pyrage raises its own RecipientError
        raise RecipientError(f"not a valid public key ({e}): {text[:24]}...") from None
    raise RecipientError(f"expected an age1... or ssh-ed25519/ssh-rsa public key, got {text[:24]!r}")


def load_recipients(items, base: Path | None = None) -> list:
    """Recipients from public keys and recipients files. Raises :class:`RecipientError`."""
    out = []
    for item in items:
        item = item.strip()
        if item.startswith(("age1", "ssh-")):
            out.append(parse_recipient(item))
            continue
        path = Path(os.path.expanduser(item))
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise RecipientError(f"cannot read recipients file {path}: {e.strerror or e}") from None
        found = [parse_recipient(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise RecipientError(f"recipients file {path} holds no public key")
        out.extend(found)
    if not out:
        raise RecipientError("no recipients")
    return out


def load_identities(path: str | os.PathLike) -> list:
    """The X25519 identities in an ``age-keygen`` style file. Raises :class:`IdentityError`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise IdentityError(f"cannot read identity file {path}: {e.strerror or e}") from None
    ids = []
    for line in lines:
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            try:
                ids.append(pyrage.x25519.Identity.from_str(line))
            except Exception as e:
                raise IdentityError(f"{path}: invalid age secret key ({e})") from None
    if not ids:
        raise IdentityError(f"{path}: no AGE-SECRET-KEY-1... line")
    return ids


def keygen(out_dir: str | os.PathLike) -> tuple[Path, Path, str]:
    """Create ``identity.txt`` (mode 0600, age-keygen format) and ``recipient.txt`` in *out_dir*.

    Refuses to overwrite an existing identity (``FileExistsError``): losing a lab's private key loses
    every bundle sealed for it. Returns (identity path, recipient path, public key).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = pyrage.x25519.Identity.generate()
    public = str(identity.to_public())
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    ident_path, rcpt_path = out / "identity.txt", out / "recipient.txt"
    fd = os.open(ident_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# created: {created}\n# public key: {public}\n{identity}\n")
        f.flush()
        os.fsync(f.fileno())
    from beemond.core.fsio import atomic_writer

    with atomic_writer(rcpt_path, "w") as f:
        f.write(public + "\n")
    return ident_path, rcpt_path, public


def encrypt_stream(reader, writer, recipients) -> None:
    """Encrypt *reader* (``read(n)``) into *writer* in constant memory; releases the GIL while working."""
    pyrage.encrypt_io(reader, writer, recipients)


def decrypt_stream(reader, writer, identities) -> None:
    """Decrypt *reader* into *writer*; raises :class:`DecryptError` on a wrong key or a damaged file.

    age authenticates every 64 KiB chunk and marks the last one, so a flipped byte or a truncated file
    fails here (after the plaintext before it was written: callers must not trust *writer* until this
    returns). ``BrokenPipeError`` from *writer* passes through unchanged.
    """
    try:
        pyrage.decrypt_io(reader, writer, identities)
    except pyrage.DecryptError as e:
        raise DecryptError(str(e) or "no identity matches") from None
    except BrokenPipeError:
        raise
    except OSError as e:  # pyrage reports a failed chunk as a bare OSError("decryption error")
        raise DecryptError(str(e)) from None


# ------------------------------------------------------------------------------------------ signing
#
# Device identity: an Ed25519 key on the Pi signs every bundle it seals. The signature is an OpenSSH
# SSHSIG (PROTOCOL.sshsig in openssh-portable, as made by ``ssh-keygen -Y sign``) over the whole
# encrypted file ``X.tar.age``, stored beside it as ``X.tar.age.sig``:
#
#   signed data = "SSHSIG" || string(namespace) || string("") || string("sha512") || string(SHA-512(file))
#   namespace   = "beemond-bundle"   (a signature made for anything else never verifies as a bundle's)
#
# (``string`` is the SSH wire encoding: a uint32 big-endian length, then the bytes.) The SHA-512 is
# computed while the ciphertext streams out of age, so signing never re-reads the bundle. A lab verifies
# with stock OpenSSH, no beemond needed:
#
#   echo "hive-07 namespaces=\"beemond-bundle\" ssh-ed25519 AAAA..." > allowed_signers
#   ssh-keygen -Y verify -f allowed_signers -I hive-07 -n beemond-bundle -s X.tar.age.sig < X.tar.age
#
# After the armor, the .sig carries one unsigned line ``Size: N`` (the bundle's length in bytes).
# ssh-keygen ignores text after the armor; beemond uses it only to name a failed check "truncated"
# rather than "altered": the verdict itself rests on the signature alone.
#
# Keys are in OpenSSH formats: the private key ``device_ed25519`` (``-----BEGIN OPENSSH PRIVATE
# KEY-----``, unencrypted, mode 0600) and the public key ``device_ed25519.pub``, one line
# ``ssh-ed25519 <base64> <comment>``. A key fingerprint is OpenSSH's: ``SHA256:`` + unpadded base64 of
# the SHA-256 of the public key blob (what ``ssh-keygen -l -f device_ed25519.pub`` prints).

import base64  # noqa: E402  (kept beside the code that uses it)
import hashlib  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402

from beemond.spool import SIG_SUFFIX  # noqa: E402,F401  (a bundle name; the spool owns them)
SIG_NAMESPACE = b"beemond-bundle"
SIG_HASH = "sha512"
MAX_SIG_BYTES = 1 << 16
DEVICE_KEY_NAME = "device_ed25519"
_SSHSIG_MAGIC = b"SSHSIG"
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"
_KEY_TYPE = b"ssh-ed25519"


class SignatureError(FormatError):
    """A bundle that fails signature verification. ``reason`` is a short code: ``unsigned``,
    ``malformed``, ``untrusted``, ``truncated``, ``mismatch``; ``str()`` is the sentence for a person."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class SigningKeyError(KeyMaterialError):
    """An unreadable signing key, or a file that is not an Ed25519 key."""


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _read_string(buf: memoryview, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(buf):
        raise ValueError("short buffer")
    (n,) = struct.unpack_from(">I", buf, pos)
    if pos + 4 + n > len(buf):
        raise ValueError("short buffer")
    return bytes(buf[pos + 4:pos + 4 + n]), pos + 4 + n


def _public_blob(public) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _string(_KEY_TYPE) + _string(raw)


def fingerprint(public) -> str:
    """OpenSSH fingerprint of an Ed25519 public key, e.g. ``SHA256:n0tQ...`` (as ``ssh-keygen -l``)."""
    digest = hashlib.sha256(_public_blob(public)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def public_line(public, comment: str = "") -> str:
    """The one-line OpenSSH form ``ssh-ed25519 <base64> [comment]``."""
    text = "ssh-ed25519 " + base64.b64encode(_public_blob(public)).decode()
    return f"{text} {comment}" if comment else text


def device_keygen(out_dir: str | os.PathLike, comment: str = "") -> tuple[Path, Path, str]:
    """Create ``device_ed25519`` (OpenSSH private key, mode 0600) and ``device_ed25519.pub`` in *out_dir*.

    Refuses to overwrite an existing private key (``FileExistsError``): a new key would make the lab
    reject this device's bundles until its trusted-devices list is updated. Returns (private key path,
    public key path, public key line).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from beemond.core.fsio import atomic_writer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    priv_path, pub_path = out / DEVICE_KEY_NAME, out / f"{DEVICE_KEY_NAME}.pub"
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    line = public_line(key.public_key(), comment)
    with atomic_writer(pub_path, "w") as f:
        f.write(line + "\n")
    return priv_path, pub_path, line


def load_signing_key(path: str | os.PathLike):
    """The Ed25519 private key in *path* (OpenSSH or PKCS#8 PEM, unencrypted). Raises :class:`SigningKeyError`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read signing key {path}: {e.strerror or e}") from None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path}: not an unencrypted OpenSSH or PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key (create one with `beemond keygen --device`)")
    return key


def parse_public_key(line: str):
    """An Ed25519 public key from an OpenSSH line ``ssh-ed25519 <base64> [comment]``. Raises ``ValueError``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise ValueError(f"expected an ssh-ed25519 public key line, got {line.strip()[:24]!r}")
    key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 key")
    return key


def load_trusted_keys(path: str | os.PathLike) -> dict[str, tuple[object, str]]:
    """Trusted device keys from a public key file or a directory of them (its ``*.pub`` files), one
    ``ssh-ed25519`` line each or several; ``#`` comments. Returns {fingerprint: (key, label)},
    the label being the line's comment or the file's name. Raises ``ValueError`` for an unreadable
    file or a line that is not an Ed25519 key, and when no key is found.
    """
    path = Path(path)
    files = sorted(p for p in path.glob("*.pub") if p.is_file()) if path.is_dir() else [path]
    keys: dict[str, tuple[object, str]] = {}
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read device key file {f}: {getattr(e, 'strerror', None) or e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                key = parse_public_key(line)
            except ValueError as e:
                raise ValueError(f"{f}:{n}: {e}") from None
            parts = line.split(None, 2)
            keys[fingerprint(key)] = (key, parts[2].strip() if len(parts) > 2 else f.stem)
    if not keys:
        raise ValueError(f"no ssh-ed25519 public key in {path}")
    return keys


class HashingWriter:
    """A binary writer that passes bytes to *raw* and feeds the same bytes to the SHA-512 that gets
    signed, so the signature costs one hash pass over the ciphertext and no re-read. (A hashing thread
    bought nothing: pyrage holds the GIL while it encrypts.)"""

    def __init__(self, raw):
        self.raw = raw
        self.hash = hashlib.new(SIG_HASH)
        self.size = 0

    def write(self, b) -> int:
        self.hash.update(b)
        n = self.raw.write(b)
        self.size += len(b)
        return n if n is not None else len(b)

    def flush(self) -> None:
        self.raw.flush()

    def digest(self) -> bytes:
        return self.hash.digest()


def _signed_data(digest: bytes) -> bytes:
    return _SSHSIG_MAGIC + _string(SIG_NAMESPACE) + _string(b"") + _string(SIG_HASH.encode()) + _string(digest)


def sign_digest(key, digest: bytes, size: int) -> bytes:
    """The ``.sig`` file's bytes for a bundle of *size* bytes whose SHA-512 is *digest* (see above)."""
    sig = key.sign(_signed_data(digest))
    blob = (_SSHSIG_MAGIC + struct.pack(">I", 1) + _string(_public_blob(key.public_key())) + _string(SIG_NAMESPACE)
            + _string(b"") + _string(SIG_HASH.encode()) + _string(_string(_KEY_TYPE) + _string(sig)))
    b64 = base64.b64encode(blob).decode()
    lines = [_ARMOR_BEGIN, *(b64[i:i + 76] for i in range(0, len(b64), 76)), _ARMOR_END, f"Size: {size}"]
    return ("\n".join(lines) + "\n").encode()


def _parse_signature(text: bytes) -> tuple[bytes, bytes, bytes, int | None]:
    """(public key blob, hash algorithm, signature bytes, claimed size) of a ``.sig`` file."""
    try:
        lines = text.decode("ascii").splitlines()
        begin, end = lines.index(_ARMOR_BEGIN), lines.index(_ARMOR_END)
        blob = memoryview(base64.b64decode("".join(lines[begin + 1:end]), validate=True))
        if bytes(blob[:6]) != _SSHSIG_MAGIC or struct.unpack_from(">I", blob, 6)[0] != 1:
            raise ValueError("not an SSHSIG version 1 signature")
        pub, pos = _read_string(blob, 10)
        namespace, pos = _read_string(blob, pos)
        _reserved, pos = _read_string(blob, pos)
        hash_alg, pos = _read_string(blob, pos)
        sig_blob, pos = _read_string(blob, pos)
        sig_type, spos = _read_string(memoryview(sig_blob), 0)
        sig, _ = _read_string(memoryview(sig_blob), spos)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise SignatureError("malformed", f"the signature file is not an SSH signature ({e})") from None
    if namespace != SIG_NAMESPACE:
        raise SignatureError("malformed", f"the signature is for namespace {namespace.decode(errors='replace')!r}, "
                                          f"not {SIG_NAMESPACE.decode()!r}")
    if sig_type != _KEY_TYPE or hash_alg not in (b"sha256", b"sha512"):
        raise SignatureError("malformed", f"unsupported signature {sig_type.decode(errors='replace')}/"
                                          f"{hash_alg.decode(errors='replace')}; expected ssh-ed25519/sha512")
    size = None
    for line in lines[end + 1:]:
        if line.startswith("Size: ") and line[6:].strip().isdigit():
            size = int(line[6:])
    return pub, hash_alg, sig, size


class Signature:
    """A parsed ``.sig`` by a trusted key (:func:`read_signature`): ``fingerprint``, ``label``,
    ``hash_name`` (``sha512`` or ``sha256``) and ``claimed`` (the unsigned ``Size:`` line, or None)."""

    def __init__(self, pub: bytes, hash_alg: bytes, sig: bytes, claimed: int | None, fingerprint: str, label: str):
        self.pub, self.hash_alg, self.sig, self.claimed = pub, hash_alg, sig, claimed
        self.fingerprint, self.label, self.hash_name = fingerprint, label, hash_alg.decode()

    def check(self, digest: bytes, size: int) -> None:
        """Verify against the *digest* (``hash_name``) of a file of *size* bytes. Raises
        :class:`SignatureError` (``truncated``, ``mismatch``)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(_read_string(memoryview(self.pub), 4 + len(_KEY_TYPE))[0]).verify(
                self.sig, _SSHSIG_MAGIC + _string(SIG_NAMESPACE) + _string(b"") + _string(self.hash_alg) + _string(digest))
        except (InvalidSignature, ValueError):
            if self.claimed is not None and size < self.claimed:
                raise SignatureError("truncated", f"truncated: {size} of the {self.claimed} bytes the device signed") from None
            raise SignatureError("mismatch", f"the signature by {self.label} ({self.fingerprint}) does not match the "
                                             "file: altered after signing") from None


def read_signature_bytes(sig_path: Path) -> bytes:
    """The bytes of the ``.sig`` file *sig_path*. Raises :class:`SignatureError` (``malformed``) for one
    that is no regular file (a FIFO, a symlink to ``/dev/zero``) or is over :data:`MAX_SIG_BYTES`, and ``OSError``."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer; a regular file ignores it.
    with open(os.open(sig_path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # /dev/zero would be read until memory ends
            raise SignatureError("malformed", f"{sig_path.name} is not a regular file")
        text = f.read(MAX_SIG_BYTES + 1)
    if len(text) > MAX_SIG_BYTES:
        raise SignatureError("malformed", f"{sig_path.name} is over {MAX_SIG_BYTES} bytes (a signature is ~300)")
    return text


def read_signature(sig_path: str | os.PathLike, trusted: dict) -> Signature:
    """Read and parse the detached signature *sig_path*, and look its key up in *trusted*
    (:func:`load_trusted_keys`). Raises :class:`SignatureError` (``unsigned``, ``malformed``, ``untrusted``)."""
    sig_path = Path(sig_path)
    try:
        text = read_signature_bytes(sig_path)
    except FileNotFoundError:
        raise SignatureError("unsigned", f"no signature: {sig_path.name} is missing") from None
    pub, hash_alg, sig, claimed = _parse_signature(text)
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(pub).digest()).decode().rstrip("=")
    if fp not in trusted:
        raise SignatureError("untrusted", f"signed by an untrusted device key {fp}")
    return Signature(pub, hash_alg, sig, claimed, fp, trusted[fp][1])


def verify_file(bundle: str | os.PathLike, trusted: dict, signature: str | os.PathLike | None = None) -> tuple[str, str, str]:
    """Check *bundle* against its detached signature (default ``BUNDLE.sig``) and *trusted* keys
    (:func:`load_trusted_keys`). Reads the bundle once. Returns (fingerprint, label, SHA-512 hex of
    the bundle). Raises :class:`SignatureError` (``unsigned``, ``malformed``, ``untrusted``,
    ``truncated``, ``mismatch``) and ``OSError`` for an unreadable bundle.
    """
    bundle = Path(bundle)
    sig = read_signature(Path(signature) if signature is not None else bundle.with_name(bundle.name + SIG_SUFFIX),
                         trusted)
    h = hashlib.new(sig.hash_name)
    size = 0
    with open(bundle, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    sig.check(h.digest(), size)
    return sig.fingerprint, sig.label, h.hexdigest()
