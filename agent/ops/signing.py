"""Signed control commands (wire format v1): the operator signs, every board verifies.

A command reaches a board on ``edge/v1/<device>/cmd/<command>`` or ``edge/v1/fleet/cmd/<command>``
from anyone who can publish to the broker, so the broker's access control is not what decides
whether a board obeys: an Ed25519 signature by an operator key the board trusts is
(:mod:`agent.ops.keys`). Boards hold public keys only.

Envelope (msgpack map, exactly these three keys, canonical like the command inside)::

    {"v": 1, "signed": <bin: the canonical command>, "sig": <bin: 64 bytes, Ed25519>}

The signature covers ``SIGNING_CONTEXT + signed``: a fixed prefix (domain separation: a signature
made with an operator key for anything else can never pass as a command) and the command's bytes
exactly as carried. The board verifies the bytes it received, then decodes them; it never
re-serialises before checking a signature.

Command (the ``signed`` bytes: a msgpack map, exactly these eight keys, canonical encoding)::

    command     str   [a-z][a-z0-9-]{0,63}: status, drain, load-model...
    args        map   str keys; values nil, bool, int, float (finite), str, bin, array, map (depth <= 8)
    device      str   the target board's device id, or "fleet" for every board
    issued_at   int   unix time in milliseconds, when the operator signed
    expires_at  int   unix time in milliseconds, after issued_at; at most the board's max TTL later
    nonce       bin   16 to 64 random bytes: what makes two identical commands distinct
    command_id  str   1 to 128 printable characters, the operator's: a repeat returns the first ack
    key_id      str   the signing key's id in the boards' keyrings

Canonical encoding: map keys sorted (by code point, which is UTF-8 byte order), every map key a
str, every integer in msgpack's shortest form, every float as float64, str as msgpack str and
bytes as bin (``use_bin_type``), no ext types, no trailing bytes. A board re-encodes what it
decoded and refuses (``malformed``) bytes that differ. Why insist: (1) one command has one
encoding, so signers in any language can be tested byte for byte against this one, and a
signature or a log line identifies a command unambiguously; (2) the types are fixed, so no field
is read one way by the verifier and another by a handler (a float32 here, a duplicate map key,
an ext type there); (3) times are integers, so no float rounding decides whether a command has
expired.

Checks, in this order, the first failure is the verdict (its ``code`` goes into the ack):

1. ``malformed``: too large, not msgpack, wrong keys or types, not canonical, expires <= issued.
   Cheapest first; nothing after this reads an unchecked field.
2. ``unknown_key`` / ``revoked_key``: the key id is not in the keyring, or it is revoked.
3. ``bad_signature``: forged, or altered after signing.
4. ``wrong_device``: signed for another board (``fleet`` is every board's); ``topic_mismatch``: the
   topic it came on names another command than the one signed (when the caller gives the topic's).
5. ``ttl_too_long`` / ``not_yet_valid`` / ``expired``: the validity window is over the board's cap,
   or ``now`` lies outside ``[issued_at - skew, expires_at + skew]`` (clock skew allowance).
6. ``replayed``: the nonce was seen (under another command id) and has not expired;
   ``store_full``: the replay store is full (see below). A command id seen before is not refused:
   the verdict carries the first acknowledgement (``repeat``), which the board sends again.

Everything before the signature costs a forger nothing, so nothing before it keeps state: only
authenticated, in-window commands reach the replay store. Device and time come after the
signature so that the reason a board gives is about a command the operator really signed.

The replay store remembers every accepted command (its nonce, its id, its first ack) until its
expiry plus the skew allowance: after that the time check refuses it anyway, so the memory needed
is bounded by the accepted-command rate times the capped TTL (``max_ttl_s``) and by ``capacity``
entries. When full (only an operator key can fill it) new commands are refused with
``store_full`` rather than old nonces forgotten early: forgetting a nonce before its command
expires would let a captured command be replayed and run twice; refusing costs only the
availability of commands while the flood lasts, and heals as entries expire.

Acknowledgement (msgpack map, one per command message, on its MQTT v5 response topic)::

    {"command_id": str | nil, "ok": bool, "code": str, "reason": str, "result": any}

``code`` is ``ok``, a refusal code above, or what the command channel adds (``busy``,
``unknown_command``, ``bad_args``, ``failed``).
"""
from __future__ import annotations

import heapq
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
from cryptography.exceptions import InvalidSignature

from agent.ops.keys import Keyring, SigningKey, check_key_id

__all__ = [
    "ENVELOPE_VERSION", "FLEET", "SIGNING_CONTEXT", "MAX_ENVELOPE_BYTES", "DEFAULT_MAX_TTL_S",
    "DEFAULT_CLOCK_SKEW_S", "DEFAULT_CAPACITY", "REFUSAL_CODES",
    "Command", "Verdict", "Verifier", "ReplayStore", "CommandError",
    "canonical_bytes", "sign", "decode_envelope", "encode_ack", "decode_ack", "make_ack",
]

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
#: The device id of a command for every board (its topic is ``edge/v1/fleet/cmd/<command>``).
FLEET = "fleet"
#: Signed before the command's bytes: domain separation (see the module docstring).
SIGNING_CONTEXT = b"edge-agent/cmd/v1\x00"
#: Checked before a byte is decoded: a command is small (a model card path, a few numbers).
MAX_ENVELOPE_BYTES = 64 * 1024
#: The longest validity window a board accepts; bounds how long a nonce must be remembered.
DEFAULT_MAX_TTL_S = 300.0
#: How far the operator's clock and the board's may disagree, either way.
DEFAULT_CLOCK_SKEW_S = 30.0
#: Commands remembered at once (accepted, not yet expired).
DEFAULT_CAPACITY = 4096

MALFORMED, UNKNOWN_KEY, REVOKED_KEY, BAD_SIGNATURE = "malformed", "unknown_key", "revoked_key", "bad_signature"
WRONG_DEVICE, TTL_TOO_LONG, NOT_YET_VALID, EXPIRED = "wrong_device", "ttl_too_long", "not_yet_valid", "expired"
REPLAYED, STORE_FULL, IN_PROGRESS, TOPIC_MISMATCH = "replayed", "store_full", "in_progress", "topic_mismatch"
REFUSAL_CODES = (MALFORMED, UNKNOWN_KEY, REVOKED_KEY, BAD_SIGNATURE, WRONG_DEVICE, TOPIC_MISMATCH, TTL_TOO_LONG,
                 NOT_YET_VALID, EXPIRED, REPLAYED, STORE_FULL, IN_PROGRESS)
ACCEPTED, REPEAT = "accepted", "repeat"

COMMAND_FIELDS = ("args", "command", "command_id", "device", "expires_at", "issued_at", "key_id", "nonce")
ENVELOPE_FIELDS = ("sig", "signed", "v")
COMMAND_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,63}")
NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_COMMAND_ID = 128
MAX_DEVICE = 128
MAX_ARGS_DEPTH = 8
SIGNATURE_BYTES = 64
_MSGPACK_INT_MIN, _MSGPACK_INT_MAX = -(2 ** 63), 2 ** 64 - 1


class CommandError(ValueError):
    """A command or envelope that does not follow the format; the message names the field."""


# --- canonical encoding ---------------------------------------------------------------------------

def _canonical(value: Any, where: str, depth: int) -> Any:
    """``value`` with every map's keys sorted; raises ``CommandError`` for a type the format lacks."""
    if depth > MAX_ARGS_DEPTH:
        raise CommandError(f"{where}: nested deeper than {MAX_ARGS_DEPTH}")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            raise CommandError(f"{where} = {value}: outside msgpack's integer range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CommandError(f"{where} = {value!r}: expected a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise CommandError(f"{where}: map key {key!r} is a {type(key).__name__}, expected str")
        return {key: _canonical(value[key], f"{where}.{key}", depth + 1) for key in sorted(value)}
    raise CommandError(f"{where}: a {type(value).__name__}, expected nil, bool, int, float, str, bin, array or map")


def canonical_bytes(value: Any, where: str = "value") -> bytes:
    """The canonical msgpack encoding of ``value`` (see the module docstring)."""
    return msgpack.packb(_canonical(value, where, 0), use_bin_type=True, use_single_float=False)


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               timestamp=0)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise CommandError(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})") from None


# --- the command ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """A decoded, well-formed command (not yet authenticated unless a ``Verdict`` says so)."""

    command: str
    args: dict
    device: str
    issued_at: int          # unix ms
    expires_at: int         # unix ms
    nonce: bytes
    command_id: str
    key_id: str

    def as_map(self) -> dict:
        return {f: getattr(self, f) for f in COMMAND_FIELDS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_command_map(fields: Any) -> Command:
    """The eight fields, checked for type and range; raises ``CommandError`` naming the first wrong one."""
    if not isinstance(fields, dict):
        raise CommandError(f"the signed command must be a map, got {type(fields).__name__}")
    missing = [f for f in COMMAND_FIELDS if f not in fields]
    if missing:
        raise CommandError(f"the signed command has no {', '.join(missing)}")
    extra = sorted(set(fields) - set(COMMAND_FIELDS))
    if extra:
        raise CommandError(f"the signed command has unknown fields {extra}; expected exactly {list(COMMAND_FIELDS)}")
    command = fields["command"]
    if not isinstance(command, str) or not COMMAND_PATTERN.fullmatch(command):
        raise CommandError(f"command = {command!r}: expected a lowercase name ([a-z][a-z0-9-]*, at most 64)")
    if not isinstance(fields["args"], dict):
        raise CommandError(f"args = {fields['args']!r}: expected a map (empty for none)")
    device = fields["device"]
    if (not isinstance(device, str) or not 0 < len(device) <= MAX_DEVICE
            or any(c in device for c in "/+#\x00")):
        raise CommandError(f"device = {device!r}: expected a device id (no '/', '+', '#'), or {FLEET!r}")
    for name in ("issued_at", "expires_at"):
        if not _is_int(fields[name]) or not 0 <= fields[name] < 2 ** 63:
            raise CommandError(f"{name} = {fields[name]!r}: expected unix time in milliseconds (a non-negative int)")
    if fields["expires_at"] <= fields["issued_at"]:
        raise CommandError(f"expires_at = {fields['expires_at']} is not after issued_at = {fields['issued_at']}")
    nonce = fields["nonce"]
    if not isinstance(nonce, bytes) or not NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise CommandError(f"nonce: expected {NONCE_BYTES} to {MAX_NONCE_BYTES} bytes (bin), "
                           f"got {len(nonce) if isinstance(nonce, bytes) else type(nonce).__name__}")
    command_id = fields["command_id"]
    if (not isinstance(command_id, str) or not 0 < len(command_id) <= MAX_COMMAND_ID
            or not command_id.isprintable()):
        raise CommandError(f"command_id = {command_id!r}: expected 1 to {MAX_COMMAND_ID} printable characters")
    problem = check_key_id(fields["key_id"])
    if problem:
        raise CommandError(problem)
    return Command(command, fields["args"], device, fields["issued_at"], fields["expires_at"], nonce,
                   command_id, fields["key_id"])


def sign(command: str, args: dict | None, device: str, key: SigningKey, *, ttl_s: float = 60.0,
         command_id: str | None = None, issued_at_ms: int | None = None, nonce: bytes | None = None) -> bytes:
    """The operator's side: the envelope of ``command`` for ``device`` (or :data:`FLEET`), signed with
    ``key``, valid from now (or ``issued_at_ms``) for ``ttl_s`` seconds. ``command_id`` defaults to a
    new UUID: give the same one to retry a command without running it twice. Raises ``CommandError``
    for a field the format does not allow."""
    if not ttl_s > 0:
        raise CommandError(f"ttl_s = {ttl_s!r}: expected seconds > 0")
    issued = int(time.time() * 1000) if issued_at_ms is None else issued_at_ms
    fields = {
        "command": command, "args": {} if args is None else args, "device": device,
        "issued_at": issued, "expires_at": issued + max(1, round(ttl_s * 1000)),
        "nonce": os.urandom(NONCE_BYTES) if nonce is None else nonce,
        "command_id": uuid.uuid4().hex if command_id is None else command_id, "key_id": key.key_id,
    }
    signed = canonical_bytes(fields, "command")
    _check_command_map(_unpack(signed, "the command"))        # the signer refuses what a board would
    return _pack_envelope(signed, key.private_key.sign(SIGNING_CONTEXT + signed))


def _pack_envelope(signed: bytes, signature: bytes) -> bytes:
    return msgpack.packb({"sig": signature, "signed": signed, "v": ENVELOPE_VERSION}, use_bin_type=True)


def decode_envelope(envelope: bytes) -> tuple[Command, bytes, bytes]:
    """``(command, signed bytes, signature)`` of a well-formed envelope; ``CommandError`` otherwise.
    Checks form only: nothing here says the command is authentic."""
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise CommandError(f"envelope must be bytes, got {type(envelope).__name__}")
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise CommandError(f"envelope of {len(envelope)} bytes exceeds the limit of {MAX_ENVELOPE_BYTES}")
    envelope = bytes(envelope)
    outer = _unpack(envelope, "the envelope")
    if not isinstance(outer, dict) or sorted(outer) != list(ENVELOPE_FIELDS):
        keys = sorted(map(str, outer)) if isinstance(outer, dict) else type(outer).__name__
        raise CommandError(f"envelope must be a map of exactly {list(ENVELOPE_FIELDS)}, got {keys}")
    if not _is_int(outer["v"]) or outer["v"] != ENVELOPE_VERSION:
        raise CommandError(f"v = {outer['v']!r}: this board reads envelope version {ENVELOPE_VERSION}")
    signed, signature = outer["signed"], outer["sig"]
    if not isinstance(signed, bytes):
        raise CommandError(f"signed must be bin, got {type(signed).__name__}")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise CommandError(f"sig must be {SIGNATURE_BYTES} bytes (bin), got "
                           f"{len(signature) if isinstance(signature, bytes) else type(signature).__name__}")
    if _pack_envelope(signed, signature) != envelope:
        raise CommandError("the envelope is not canonically encoded (keys sig, signed, v in this order, "
                           "shortest forms): build it with agent.ops.signing.sign")
    fields = _unpack(signed, "the signed command")
    command = _check_command_map(fields)
    try:
        canonical = canonical_bytes(fields, "command")
    except CommandError as exc:
        raise CommandError(f"args: {exc}") from None
    if canonical != signed:
        raise CommandError("the signed command is not canonically encoded (sorted keys, shortest ints, "
                           "float64, no ext types): re-encode it with agent.ops.signing.canonical_bytes")
    return command, signed, signature


# --- acknowledgements -----------------------------------------------------------------------------

def make_ack(command_id: str | None, ok: bool, code: str, reason: str, result: Any = None) -> dict:
    return {"command_id": command_id, "ok": ok, "code": code, "reason": reason, "result": result}


def encode_ack(ack: dict) -> bytes:
    return msgpack.packb(ack, use_bin_type=True, default=str)


def decode_ack(payload: bytes) -> dict:
    ack = msgpack.unpackb(payload, raw=False, strict_map_key=False)   # a status result has int keys
    if not isinstance(ack, dict) or not {"command_id", "ok", "code", "reason"} <= set(ack):
        raise CommandError(f"not an acknowledgement: {ack!r:.200}")
    return ack


# --- the board's side -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What the board makes of one envelope. ``accepted``: run it, then :meth:`Verifier.record` its
    ack. ``repeat``: its command id was accepted before; send ``first_ack`` again, run nothing.
    Otherwise a refusal: ``code`` (one of :data:`REFUSAL_CODES`) and ``reason``."""

    code: str
    reason: str
    command: Command | None = None
    first_ack: dict | None = None

    @property
    def accepted(self) -> bool:
        return self.code == ACCEPTED

    @property
    def repeat(self) -> bool:
        return self.code == REPEAT

    def refusal_ack(self) -> dict:
        return make_ack(self.command.command_id if self.command else None, False, self.code, self.reason)


class ReplayStore:
    """Accepted commands until they expire: nonce -> command id, command id -> (expiry, first ack).

    Bounded by ``capacity``: when full after dropping the expired, :meth:`reserve` says so and the
    caller refuses the command (never forgets a live nonce early). Not thread-safe: the
    :class:`Verifier` holds its lock around it.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity = {capacity}: expected at least 1")
        self.capacity = capacity
        self._nonces: dict[bytes, str] = {}
        self._entries: dict[str, tuple[float, bytes, dict | None]] = {}   # id -> (until, nonce, ack)
        self._expiry: list[tuple[float, str]] = []                        # heap of (until, id)

    def __len__(self) -> int:
        return len(self._entries)

    def purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            until, command_id = heapq.heappop(self._expiry)
            entry = self._entries.get(command_id)
            if entry is not None and entry[0] == until:
                del self._entries[command_id]
                self._nonces.pop(entry[1], None)

    def lookup(self, command_id: str, nonce: bytes, now: float) -> tuple[str | None, dict | None]:
        """``(REPEAT, ack)``, ``(IN_PROGRESS, None)``, ``(REPLAYED, None)`` or ``(None, None)`` (new)."""
        self.purge(now)
        entry = self._entries.get(command_id)
        if entry is not None:
            return (REPEAT, entry[2]) if entry[2] is not None else (IN_PROGRESS, None)
        if nonce in self._nonces:
            return REPLAYED, None
        return None, None

    def reserve(self, command_id: str, nonce: bytes, until: float) -> bool:
        """Remember an accepted command until ``until``; ``False`` if full (nothing remembered)."""
        if len(self._entries) >= self.capacity:
            return False
        self._entries[command_id] = (until, nonce, None)
        self._nonces[nonce] = command_id
        heapq.heappush(self._expiry, (until, command_id))
        return True

    def record(self, command_id: str, ack: dict) -> None:
        entry = self._entries.get(command_id)
        if entry is not None:
            self._entries[command_id] = (entry[0], entry[1], ack)


class _RefusalLog:
    """A log line per refusal, at most ``burst`` per ``window_s`` (a flood of forgeries must not
    fill the board's disk); the lines held back are counted in the next one."""

    def __init__(self, burst: int = 10, window_s: float = 10.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._window_start = -math.inf
        self._in_window = 0
        self._held_back = 0

    def __call__(self, verdict: Verdict, now: float) -> None:
        if now - self._window_start >= self.window_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self._held_back += 1
            return
        self._in_window += 1
        held, self._held_back = self._held_back, 0
        cmd = verdict.command
        log.warning("command refused: %s: %s%s%s", verdict.code, verdict.reason,
                    f" (command {cmd.command!r} id {cmd.command_id!r} key {cmd.key_id!r})" if cmd else "",
                    f" [{held} refusals not logged before this]" if held else "")


class Verifier:
    """A board's judge of command envelopes: ``verify(envelope) -> Verdict`` (thread-safe).

    ``device`` is this board's id; ``keyring`` its trusted keys. ``clock`` gives unix seconds
    (``time.time``; tests give their own). ``refusals`` counts refusals by code.
    """

    def __init__(self, device: str, keyring: Keyring, *, max_ttl_s: float = DEFAULT_MAX_TTL_S,
                 clock_skew_s: float = DEFAULT_CLOCK_SKEW_S, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], float] = time.time) -> None:
        if not 0 < max_ttl_s <= 3600:
            raise ValueError(f"max_ttl_s = {max_ttl_s!r}: expected seconds in (0, 3600]")
        if not 0 <= clock_skew_s <= 600:
            raise ValueError(f"clock_skew_s = {clock_skew_s!r}: expected seconds in [0, 600]")
        self.device = device
        self.keyring = keyring
        self.max_ttl_ms = round(max_ttl_s * 1000)
        self.skew_ms = round(clock_skew_s * 1000)
        self.clock = clock
        self.store = ReplayStore(capacity)
        self.refusals: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._log = _RefusalLog()

    def verify(self, envelope: bytes, expect_command: str | None = None) -> Verdict:
        """The verdict on ``envelope``; ``expect_command``: the command its topic names (a signed
        ``status`` published on ``.../cmd/drain`` is refused before it can use up its command id)."""
        verdict = self._judge(envelope, expect_command)
        if not (verdict.accepted or verdict.repeat):
            with self._lock:
                self.refusals[verdict.code] += 1
                self._log(verdict, time.monotonic())
        return verdict

    def record(self, command_id: str, ack: dict) -> None:
        """The first acknowledgement of an accepted command: what a repeat of its id gets."""
        with self._lock:
            self.store.record(command_id, ack)

    def _judge(self, envelope: bytes, expect_command: str | None) -> Verdict:
        try:
            command, signed, signature = decode_envelope(envelope)
        except CommandError as exc:
            return Verdict(MALFORMED, str(exc))
        public_key, problem = self.keyring.lookup(command.key_id)
        if public_key is None:
            why = "is revoked" if problem == REVOKED_KEY else "is not in this board's keyring"
            return Verdict(problem, f"key {command.key_id!r} {why}", command)
        try:
            public_key.verify(signature, SIGNING_CONTEXT + signed)
        except InvalidSignature:
            return Verdict(BAD_SIGNATURE, f"the signature does not match key {command.key_id!r}: "
                                          f"forged, or altered after signing", command)
        if command.device not in (self.device, FLEET):
            return Verdict(WRONG_DEVICE, f"signed for device {command.device!r}; this is {self.device!r}", command)
        if expect_command is not None and command.command != expect_command:
            return Verdict(TOPIC_MISMATCH, f"signed as {command.command!r}, published on the topic of "
                                           f"{expect_command!r}", command)
        ttl_ms = command.expires_at - command.issued_at
        if ttl_ms > self.max_ttl_ms:
            return Verdict(TTL_TOO_LONG, f"valid for {ttl_ms / 1000:g} s; this board accepts at most "
                                         f"{self.max_ttl_ms / 1000:g} s", command)
        now_ms = self.clock() * 1000.0
        if now_ms < command.issued_at - self.skew_ms:
            return Verdict(NOT_YET_VALID, f"issued {(command.issued_at - now_ms) / 1000:.1f} s in this board's "
                                          f"future (allowed skew {self.skew_ms / 1000:g} s)", command)
        if now_ms > command.expires_at + self.skew_ms:
            return Verdict(EXPIRED, f"expired {(now_ms - command.expires_at) / 1000:.1f} s ago "
                                    f"(allowed skew {self.skew_ms / 1000:g} s)", command)
        with self._lock:
            seen, first_ack = self.store.lookup(command.command_id, command.nonce, now_ms)
            if seen == REPEAT:
                return Verdict(REPEAT, f"command id {command.command_id!r} was accepted before: its first "
                                       f"acknowledgement again", command, first_ack)
            if seen == IN_PROGRESS:
                return Verdict(IN_PROGRESS, f"command id {command.command_id!r} is still running", command)
            if seen == REPLAYED:
                return Verdict(REPLAYED, "nonce already used by another command (a replay)", command)
            if not self.store.reserve(command.command_id, command.nonce, command.expires_at + self.skew_ms):
                return Verdict(STORE_FULL, f"{self.store.capacity} unexpired commands remembered: refusing new "
                                           f"ones until some expire (forgetting early would allow replays)",
                               command)
        return Verdict(ACCEPTED, "accepted", command)
