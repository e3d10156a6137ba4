"""Ed25519 key files: the operator's signing key, the board's trusted public keys, revocation.

The asymmetry is the point: a board holds public keys only, so a board that is stolen (or whose
disk is read) yields nothing that can command the other boards. The private key stays with the
operator, in a file only its owner can read (0600), made by ``edge-agent keys generate``.

Files (``edge-agent keys generate --out DIR --key-id NAME``):

``DIR/NAME.key``
    the private key, PKCS#8 PEM, unencrypted, mode 0600. Created with ``O_EXCL`` and the mode
    given at creation, so it never exists with wider permissions, and an existing key is never
    overwritten (losing an operator key to a typo would lock the fleet out).
``DIR/NAME.pub``
    the public key, SubjectPublicKeyInfo PEM, mode 0644: copy it into each board's keyring.

A key's id is its file's stem: the signer puts it in each command, the board looks it up in its
keyring. A keyring is a directory of ``<key_id>.pub`` files (PEM, or the raw 32-byte key) and an
optional ``revoked`` file: one entry a line, a key id or a ``sha256:<hex>`` fingerprint of a
public key (``#`` starts a comment). A fingerprint revokes the key itself, whatever id it is
filed under. Revocation wins over presence: a revoked key whose ``.pub`` is still in the
directory is refused as revoked, so removing a key and revoking it are not the same mistake.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KEY_ID_PATTERN", "KeyFileError", "SigningKey", "Keyring", "KeyPair",
    "generate_key_pair", "load_signing_key", "load_public_key", "fingerprint", "check_key_id",
    "parse_public_key", "install_key",
]

#: A key id: what a file stem and a command's ``key_id`` may be.
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The name of the revocation list inside a keyring directory.
REVOKED_FILE = "revoked"


class KeyFileError(ValueError):
    """A key file that cannot be used, naming the file and what was wrong."""


def check_key_id(key_id: object) -> str | None:
    """Why ``key_id`` is not a valid key id, or ``None`` if it is."""
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        return (f"key_id = {key_id!r}: expected 1 to 64 letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit")
    return None


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key: what a revocation list may name."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """An operator's private key with the id the boards know it by."""

    key_id: str
    private_key: Ed25519PrivateKey

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True)
class KeyPair:
    """Where ``generate_key_pair`` wrote a pair."""

    key_id: str
    private_path: Path
    public_path: Path
    fingerprint: str


def generate_key_pair(out_dir: str | os.PathLike, key_id: str | None = None) -> KeyPair:
    """Make a new Ed25519 key pair in ``out_dir``: ``<key_id>.key`` (0600) and ``<key_id>.pub`` (0644).

    ``key_id`` defaults to ``op-`` and the first 12 hex digits of the public key's fingerprint.
    Raises ``FileExistsError`` if either file exists (nothing is written then), ``KeyFileError`` for a
    bad key id. ``out_dir`` is created (0700) if missing.
    """
    private_key = Ed25519PrivateKey.generate()
    public_key = private_key.public_key()
    if key_id is None:
        key_id = "op-" + fingerprint(public_key)[len("sha256:"):][:12]
    problem = check_key_id(key_id)
    if problem:
        raise KeyFileError(problem)
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = out / f"{key_id}.key", out / f"{key_id}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists: refusing to overwrite a key (choose another --key-id or --out)")
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    public_pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return KeyPair(key_id, private_path, public_path, fingerprint(public_key))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never replace it) with ``mode`` from its first byte on: ``O_EXCL`` refuses an
    existing file or link, and the mode is set at creation (then fchmod, as the umask may narrow it
    but must not decide it), so a private key is never readable by others, not even for an instant."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)


def load_signing_key(path: str | os.PathLike, key_id: str | None = None) -> SigningKey:
    """The operator's key from ``path`` (``<key_id>.key``, PKCS#8 PEM); its id is the file's stem
    unless ``key_id`` is given. Refuses, like ssh, a file that others may read or write."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"private key {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise KeyFileError(f"private key {path}: permissions {mode:04o} are too open (others may read it); "
                        f"expected 0600: chmod 600 {path}")
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"private key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path}: a {type(private_key).__name__}, expected an Ed25519 key")
    key_id = path.stem if key_id is None else key_id
    problem = check_key_id(key_id)
    if problem:
        raise KeyFileError(f"private key {path}: {problem} (rename the file or give the key id)")
    return SigningKey(key_id, private_key)


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo) or a file of its raw 32 bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"public key {path}: {exc.strerror or exc}") from None
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"public key {path}: neither PEM nor 32 raw bytes ({exc})") from None
    if not isinstance(public_key, Ed25519PublicKey):
        raise KeyFileError(f"public key {path}: a {type(public_key).__name__}, expected an Ed25519 key")
    return public_key


@dataclass
class Keyring:
    """The public keys a board trusts, by key id, and the revoked ids and fingerprints."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked_ids: frozenset[str] = frozenset()
    revoked_fingerprints: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Fingerprints are resolved to ids once, not hashed again on every command.
        self._revoked_by_fingerprint = frozenset(
            key_id for key_id, key in self.keys.items() if fingerprint(key) in self.revoked_fingerprints)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "Keyring":
        """Every ``<key_id>.pub`` of ``directory`` and its ``revoked`` list. Raises ``KeyFileError``
        naming the first bad file: a board that cannot read its keyring must not start half-trusting."""
        directory = Path(directory)
        if not directory.is_dir():
            raise KeyFileError(f"keyring {directory}: not a directory")
        keys = {}
        for path in sorted(directory.glob("*.pub")):
            problem = check_key_id(path.stem)
            if problem:
                raise KeyFileError(f"keyring {path}: {problem}")
            keys[path.stem] = load_public_key(path)
        revoked_path = directory / REVOKED_FILE
        ids, fingerprints = set(), set()
        if revoked_path.exists():
            for number, line in enumerate(revoked_path.read_text().splitlines(), 1):
                entry = line.split("#", 1)[0].strip()
                if not entry:
                    continue
                if entry.startswith("sha256:"):
                    if not re.fullmatch(r"sha256:[0-9a-f]{64}", entry):
                        raise KeyFileError(f"{revoked_path}:{number}: {entry!r}: expected sha256: and 64 lowercase hex digits")
                    fingerprints.add(entry)
                elif check_key_id(entry) is None:
                    ids.add(entry)
                else:
                    raise KeyFileError(f"{revoked_path}:{number}: {entry!r}: expected a key id or sha256:<hex>")
        return cls(keys, frozenset(ids), frozenset(fingerprints))

    def lookup(self, key_id: str) -> tuple[Ed25519PublicKey | None, str | None]:
        """``(key, None)`` for a trusted key; ``(None, "revoked_key" | "unknown_key")`` otherwise."""
        if key_id in self.revoked_ids:
            return None, "revoked_key"
        key = self.keys.get(key_id)
        if key is None:
            return None, "unknown_key"
        if key_id in self._revoked_by_fingerprint:
            return None, "revoked_key"
        return key, None


def parse_public_key(data: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text or bytes (SubjectPublicKeyInfo), or its raw 32 bytes
    (what a ``rotate-key`` command carries). Raises ``KeyFileError`` saying what it got."""
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, bytes):
        raise KeyFileError(f"public_key: a {type(data).__name__}, expected PEM text or 32 raw bytes")
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"public_key: neither PEM nor 32 raw bytes ({exc})") from None
    if not isinstance(public_key, Ed25519PublicKey):
        raise KeyFileError(f"public_key: a {type(public_key).__name__}, expected an Ed25519 key")
    return public_key


def _replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, flushed to disk, renamed over
    it, the directory flushed too. A board that loses power mid-write keeps the old file or the new
    one, never half a key or half a revocation list."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def install_key(directory: str | os.PathLike, key_id: str, public_key: Ed25519PublicKey,
                revoke: tuple[str, ...] = (), note: str = "") -> Keyring:
    """Trust ``public_key`` as ``key_id`` in the keyring ``directory`` and revoke the ids of
    ``revoke``, on disk (each file replaced atomically: the key first, so a crash between the two
    never leaves a board trusting no key), then return the keyring read back from the directory:
    what the board trusts now is what it will trust after a restart.

    Raises ``KeyFileError`` for a bad id, an id already trusted with another key, a revoked id, or
    a revocation of an id the keyring does not hold (a typo must not pass silently). Installing the
    same key under the same id again changes nothing (a resent command)."""
    directory = Path(directory)
    current = Keyring.from_dir(directory)
    problem = check_key_id(key_id)
    if problem:
        raise KeyFileError(problem)
    if key_id in current.revoked_ids or fingerprint(public_key) in current.revoked_fingerprints:
        raise KeyFileError(f"key {key_id!r} is revoked on this board: a revoked key is never trusted again "
                           f"(install the new key under a new id)")
    if key_id in revoke:
        raise KeyFileError(f"revoke = {list(revoke)}: names the key being installed ({key_id!r})")
    for old in revoke:
        if old not in current.keys:
            raise KeyFileError(f"revoke: no key {old!r} in this board's keyring (it has {sorted(current.keys)})")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    existing = current.keys.get(key_id)
    if existing is not None:
        if existing.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != raw:
            raise KeyFileError(f"key id {key_id!r} is trusted already with another key: choose a new id")
    else:
        _replace_file(directory / f"{key_id}.pub", public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    new_revocations = [old for old in revoke if old not in current.revoked_ids]
    if new_revocations:
        revoked_path = directory / REVOKED_FILE
        text = revoked_path.read_text() if revoked_path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        suffix = f"  # {note}" if note else ""
        text += "".join(f"{old}{suffix}\n" for old in new_revocations)
        _replace_file(revoked_path, text.encode())
    return Keyring.from_dir(directory)
