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


class RecipientError(ValueError):
    """A recipient that is not an age or SSH public key, or an unreadable recipients file."""


class DecryptError(Exception):
    """Not decryptable: no matching identity, or the ciphertext is damaged or truncated."""


class IdentityError(ValueError):
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
    from beemond.archive import atomic_writer

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
