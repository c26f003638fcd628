"""Mosquitto password files, written without the ``mosquitto_passwd`` binary.

Mosquitto 2.0 stores one ``user:hash`` line per account; the hash this module
writes is its PBKDF2-SHA512 format (what ``mosquitto_passwd`` writes by default):

    user:$7$<iterations>$<base64 of a 12-byte salt>$<base64 of the 64-byte derived key>

Also home of ``write_secret_file``: every file holding a secret (password file,
private keys, credential bundles) is written through it, atomically and 0600.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path

from broker.errors import ConfigError

ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12  # mosquitto's SALT_LEN
KEY_BYTES = 64  # SHA-512 output


def generate_password(nbytes: int = 24) -> str:
    """A random URL-safe password (``nbytes`` of entropy, no ':' or whitespace)."""
    return secrets.token_urlsafe(nbytes)


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The ``$7$...`` hash mosquitto 2.0 checks ``password`` against."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, KEY_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches a ``$7$`` (PBKDF2-SHA512) or ``$6$`` (salted SHA512) hash."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, key = int(parts[2]), base64.b64decode(parts[3]), parts[4]
            mine = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, KEY_BYTES)
        elif len(parts) == 4 and parts[1] == "6":
            salt, key = base64.b64decode(parts[2]), parts[3]
            mine = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
        return hmac.compare_digest(base64.b64decode(key), mine)
    except ValueError:
        return False


def write_secret_file(path: str | Path, data: str | bytes, mode: int = 0o600) -> Path:
    """Write ``data`` atomically (temp file + rename) with ``mode`` from the first byte on."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_user(user: str) -> None:
    if not user or any(c in user for c in ":\n\r") or user != user.strip():
        raise ConfigError(f"invalid user name {user!r} for a password file")


def write_password_hashes(path: str | Path, hashes: Mapping[str, str]) -> Path:
    """Write already hashed entries ``{user: "$7$..."}`` as a 0600 password file."""
    for user in hashes:
        _check_user(user)
    return write_secret_file(path, "".join(f"{u}:{h}\n" for u, h in sorted(hashes.items())))


def write_password_file(path: str | Path, passwords: Mapping[str, str]) -> Path:
    """Hash every ``{user: password}`` and write the 0600 password file mosquitto reads."""
    return write_password_hashes(path, {u: hash_password(p) for u, p in passwords.items()})


def read_password_file(path: str | Path) -> dict[str, str]:
    """``{user: hash}`` of a mosquitto password file; ConfigError naming the file if malformed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read password file: {exc}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ConfigError(f"{path}:{number}: not a 'user:hash' line")
        entries[user] = hashed
    return entries
