"""Signed control commands: key files, the envelope, and every reason a board refuses a command.

The board side sees public keys only (a keyring directory with the ``.pub`` copied in), as on a
real board. Time is the Verifier's injected clock, so expiry is tested without waiting.
"""
import logging
import shutil
import stat
import subprocess
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ops.keys import Keyring, KeyFileError, generate_key_pair, load_signing_key
from agent.ops.signing import (
    FLEET, MAX_ENVELOPE_BYTES, REFUSAL_CODES, SIGNING_CONTEXT, CommandError, Verifier, canonical_bytes,
    decode_envelope, make_ack, sign,
)

NOW_S = 1_800_000_000.0          # the tests' wall clock, unix seconds
NOW_MS = int(NOW_S * 1000)


class Clock:
    def __init__(self, t: float = NOW_S) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    """Two operator keys (alice, bob) and a board keyring holding their public keys only."""
    keys = tmp_path_factory.mktemp("operator")
    board = tmp_path_factory.mktemp("board-keyring")
    for name in ("alice", "bob"):
        pair = generate_key_pair(keys, name)
        shutil.copy(pair.public_path, board / pair.public_path.name)
    return {"alice": load_signing_key(keys / "alice.key"), "bob": load_signing_key(keys / "bob.key"),
            "keys": keys, "board": board}


def verifier(operator, device="board-1", clock=None, **kw) -> Verifier:
    return Verifier(device, Keyring.from_dir(operator["board"]), clock=clock or Clock(), **kw)


def signed(operator, command="status", args=None, device="board-1", key="alice", **kw) -> bytes:
    kw.setdefault("issued_at_ms", NOW_MS)
    return sign(command, args, device, operator[key], **kw)


def resign(operator, fields: dict, key="alice") -> bytes:
    """A properly signed envelope of arbitrary (canonically encoded) fields."""
    body = canonical_bytes(fields)
    sig = operator[key].private_key.sign(SIGNING_CONTEXT + body)
    return msgpack.packb({"sig": sig, "signed": body, "v": 1}, use_bin_type=True)


def fields_of(envelope: bytes) -> dict:
    return msgpack.unpackb(msgpack.unpackb(envelope)["signed"], raw=False)


# --- key files ------------------------------------------------------------------------------------

def test_keys_generate_makes_a_0600_private_key_and_a_public_key_that_alone_verifies(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "keys", "generate", "--out", str(tmp_path / "k"),
                          "--key-id", "ops-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    private, public = tmp_path / "k" / "ops-1.key", tmp_path / "k" / "ops-1.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert b"PRIVATE" not in public.read_bytes()
    board = tmp_path / "board"
    board.mkdir()
    shutil.copy(public, board / public.name)          # the board gets the public key, nothing else
    envelope = sign("status", {}, "b", load_signing_key(private), issued_at_ms=NOW_MS)
    verdict = Verifier("b", Keyring.from_dir(board), clock=Clock()).verify(envelope)
    assert verdict.accepted, verdict.reason
    assert verdict.command.key_id == "ops-1"

    before = private.read_bytes()
    again = subprocess.run([sys.executable, "-m", "agent.cli", "keys", "generate", "--out", str(tmp_path / "k"),
                            "--key-id", "ops-1"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert private.read_bytes() == before


def test_a_private_key_others_can_read_is_refused(tmp_path):
    pair = generate_key_pair(tmp_path, "loose")
    pair.private_path.chmod(0o644)
    with pytest.raises(KeyFileError, match="0644 are too open"):
        load_signing_key(pair.private_path)


# --- accepted ---------------------------------------------------------------------------------------

def test_a_signed_command_is_accepted_with_its_fields(operator):
    envelope = signed(operator, "set-batching", {"model": "m", "max_batch": 8, "wait_ms": 1.5}, ttl_s=30)
    verdict = verifier(operator).verify(envelope)
    assert verdict.accepted, verdict.reason
    cmd = verdict.command
    assert (cmd.command, cmd.device, cmd.key_id) == ("set-batching", "board-1", "alice")
    assert cmd.args == {"max_batch": 8, "model": "m", "wait_ms": 1.5}
    assert cmd.expires_at - cmd.issued_at == 30_000 and len(cmd.nonce) == 16


def test_the_encoding_is_canonical_whatever_the_order_of_the_args(operator):
    a = signed(operator, args={"b": 1, "a": {"y": 2, "x": 1}}, nonce=b"n" * 16, command_id="c")
    b = signed(operator, args={"a": {"x": 1, "y": 2}, "b": 1}, nonce=b"n" * 16, command_id="c")
    assert msgpack.unpackb(a)["signed"] == msgpack.unpackb(b)["signed"]


def test_a_fleet_command_is_accepted_by_every_board(operator):
    envelope = signed(operator, device=FLEET)
    assert verifier(operator, "board-1").verify(envelope).accepted
    assert verifier(operator, "board-2").verify(envelope).accepted


# --- refused: forged, wrong key, wrong board, wrong time ----------------------------------------------

def test_a_bit_flip_in_the_signature_or_the_signed_command_is_refused_as_forged(operator):
    envelope = signed(operator)
    outer = msgpack.unpackb(envelope)
    sig = bytearray(outer["sig"])
    sig[10] ^= 0x01
    flipped_sig = msgpack.packb({"sig": bytes(sig), "signed": outer["signed"], "v": 1}, use_bin_type=True)
    fields = fields_of(envelope)
    nonce = bytearray(fields["nonce"])
    nonce[0] ^= 0x80                                   # still well formed: the nonce is any 16 bytes
    body = canonical_bytes(dict(fields, nonce=bytes(nonce)))
    flipped_body = msgpack.packb({"sig": outer["sig"], "signed": body, "v": 1}, use_bin_type=True)
    for forged in (flipped_sig, flipped_body):
        verdict = verifier(operator).verify(forged)
        assert verdict.code == "bad_signature" and "forged" in verdict.reason


def test_a_command_signed_by_bob_under_alices_key_id_is_forged(operator):
    fields = fields_of(signed(operator))
    assert verifier(operator).verify(resign(operator, fields, key="bob")).code == "bad_signature"


def test_a_command_for_another_board_is_refused(operator):
    verdict = verifier(operator, "board-1").verify(signed(operator, device="board-2"))
    assert verdict.code == "wrong_device" and "'board-2'" in verdict.reason


def test_expired_not_yet_valid_and_too_long_lived_commands_are_refused(operator):
    clock = Clock()
    board = verifier(operator, clock=clock, clock_skew_s=30)
    envelope = signed(operator, ttl_s=60)
    clock.t = NOW_S + 60 + 31
    assert board.verify(envelope).code == "expired"
    clock.t = NOW_S + 60 + 29                          # past expiry, within the skew allowance
    assert board.verify(envelope).accepted
    clock.t = NOW_S - 31
    early = signed(operator)
    verdict = board.verify(early)
    assert verdict.code == "not_yet_valid" and "future" in verdict.reason
    clock.t = NOW_S
    verdict = board.verify(signed(operator, ttl_s=301))
    assert verdict.code == "ttl_too_long" and "at most 300 s" in verdict.reason


def test_unknown_and_revoked_keys_are_refused(operator, tmp_path):
    stranger = generate_key_pair(tmp_path / "stranger", "mallory")
    verdict = verifier(operator).verify(
        sign("status", {}, "board-1", load_signing_key(stranger.private_path), issued_at_ms=NOW_MS))
    assert verdict.code == "unknown_key" and "'mallory'" in verdict.reason

    board = tmp_path / "board"
    shutil.copytree(operator["board"], board)
    (board / "revoked").write_text("# lost laptop\nalice\n")
    by_id = Verifier("board-1", Keyring.from_dir(board), clock=Clock())
    assert by_id.verify(signed(operator, key="alice")).code == "revoked_key"
    assert by_id.verify(signed(operator, key="bob")).accepted

    from agent.ops.keys import fingerprint
    (board / "revoked").write_text(fingerprint(operator["bob"].public_key()) + "\n")
    by_fingerprint = Verifier("board-1", Keyring.from_dir(board), clock=Clock())
    assert by_fingerprint.verify(signed(operator, key="bob")).code == "revoked_key"
    assert by_fingerprint.verify(signed(operator, key="alice")).accepted


def test_a_bad_revocation_list_stops_the_keyring_from_loading(operator, tmp_path):
    board = tmp_path / "board"
    shutil.copytree(operator["board"], board)
    (board / "revoked").write_text("sha256:nothex\n")
    with pytest.raises(KeyFileError, match="revoked:1"):
        Keyring.from_dir(board)


# --- refused: malformed -------------------------------------------------------------------------------

def _malformed_cases(operator) -> dict[str, bytes]:
    good = fields_of(signed(operator))
    outer = msgpack.unpackb(signed(operator))
    missing = {k: v for k, v in good.items() if k != "nonce"}
    unsorted_body = msgpack.packb(dict(reversed(list(good.items()))), use_bin_type=True)
    sig = operator["alice"].private_key.sign(SIGNING_CONTEXT + unsorted_body)
    float32 = msgpack.packb(dict(sorted(dict(good, args={"x": 1.5}).items())), use_bin_type=True, use_single_float=True)
    return {
        "garbage": b"\xc1\xff not msgpack",
        "empty": b"",
        "not a map": msgpack.packb([1, 2, 3]),
        "envelope keys": msgpack.packb({"v": 1, "signed": outer["signed"]}, use_bin_type=True),
        "version": msgpack.packb({"sig": outer["sig"], "signed": outer["signed"], "v": 2}, use_bin_type=True),
        "short sig": msgpack.packb({"sig": b"x" * 10, "signed": outer["signed"], "v": 1}, use_bin_type=True),
        "signed as str": msgpack.packb({"sig": outer["sig"], "signed": "text", "v": 1}, use_bin_type=True),
        "missing nonce": resign(operator, missing),
        "extra field": resign(operator, dict(good, admin=True)),
        "issued_at str": resign(operator, dict(good, issued_at="now")),
        "issued_at float": resign(operator, dict(good, issued_at=float(NOW_MS))),
        "expires before issued": resign(operator, dict(good, expires_at=good["issued_at"])),
        "nonce short": resign(operator, dict(good, nonce=b"abc")),
        "nonce str": resign(operator, dict(good, nonce="x" * 16)),
        "args list": resign(operator, dict(good, args=[1])),
        "command upper": resign(operator, dict(good, command="DRAIN")),
        "device wildcard": resign(operator, dict(good, device="#")),
        "key_id bad": resign(operator, dict(good, key_id="../etc/passwd")),
        "command_id empty": resign(operator, dict(good, command_id="")),
        "not canonical, validly signed": msgpack.packb({"sig": sig, "signed": unsorted_body, "v": 1}, use_bin_type=True),
        "float32 arg": msgpack.packb({"sig": outer["sig"], "signed": float32, "v": 1}, use_bin_type=True),
        "ext type arg": msgpack.packb({"sig": outer["sig"], "v": 1, "signed": msgpack.packb(
            dict(sorted(dict(good, args={"x": msgpack.ExtType(5, b"hi")}).items())), use_bin_type=True)},
            use_bin_type=True),
        "too large": b"\x00" * (MAX_ENVELOPE_BYTES + 1),
    }


def test_malformed_envelopes_are_refused_with_what_was_wrong(operator):
    board = verifier(operator)
    for name, envelope in _malformed_cases(operator).items():
        verdict = board.verify(envelope)
        assert verdict.code == "malformed", (name, verdict)
        assert verdict.reason, name
    reasons = {name: board.verify(e).reason for name, e in _malformed_cases(operator).items()}
    assert "nonce" in reasons["missing nonce"] and "admin" in reasons["extra field"]
    assert "issued_at" in reasons["issued_at str"] and "canonical" in reasons["not canonical, validly signed"]
    assert "exceeds the limit" in reasons["too large"]


def test_the_signer_refuses_what_a_board_would(operator):
    with pytest.raises(CommandError, match="command = 'Bad'"):
        sign("Bad", {}, "b", operator["alice"])
    with pytest.raises(CommandError, match="finite"):
        sign("status", {"x": float("nan")}, "b", operator["alice"])
    with pytest.raises(CommandError, match="map key 1"):
        sign("status", {1: "x"}, "b", operator["alice"])


# --- replay and idempotency ---------------------------------------------------------------------------

def test_a_reused_nonce_is_refused_as_a_replay(operator):
    board = verifier(operator)
    assert board.verify(signed(operator, nonce=b"N" * 16, command_id="first")).accepted
    verdict = board.verify(signed(operator, "drain", nonce=b"N" * 16, command_id="second"))
    assert verdict.code == "replayed"


def test_a_repeated_command_id_gets_the_first_acknowledgement_and_does_not_run_again(operator):
    board = verifier(operator)
    envelope = signed(operator, "drain", command_id="op-42")
    first = board.verify(envelope)
    assert first.accepted
    # Until its ack is recorded a repeat is not run either.
    assert board.verify(envelope).code == "in_progress"
    ack = make_ack("op-42", True, "ok", "draining", {"queued": 3})
    board.record("op-42", ack)
    for repeat in (envelope, signed(operator, "drain", command_id="op-42")):   # resent, and re-signed
        verdict = board.verify(repeat)
        assert verdict.repeat and verdict.first_ack == ack


def test_the_replay_store_is_bounded_and_refuses_rather_than_forgets(operator):
    clock = Clock()
    board = verifier(operator, clock=clock, capacity=3, clock_skew_s=0)
    for i in range(3):
        assert board.verify(signed(operator, ttl_s=10, command_id=f"c{i}")).accepted
    verdict = board.verify(signed(operator, ttl_s=10, command_id="c3"))
    assert verdict.code == "store_full" and len(board.store) == 3
    kept = signed(operator, ttl_s=10, command_id="c0")
    assert board.verify(kept).code == "in_progress"            # c0 not forgotten to make room
    clock.t = NOW_S + 11                                        # the three have expired
    assert board.verify(signed(operator, issued_at_ms=NOW_MS + 11_000, ttl_s=10, command_id="c3")).accepted
    assert len(board.store) == 1


def test_refusals_keep_no_state_and_their_log_is_rate_limited(operator, caplog):
    board = verifier(operator)
    forged = bytearray(signed(operator))
    forged[10] ^= 0x01                               # inside the signature
    with caplog.at_level(logging.WARNING, logger="agent.ops.signing"):
        for _ in range(200):
            assert board.verify(bytes(forged)).code == "bad_signature"
    assert len(board.store) == 0
    assert board.refusals["bad_signature"] == 200
    lines = [r.getMessage() for r in caplog.records if "command refused" in r.getMessage()]
    assert 0 < len(lines) <= 20 and "bad_signature" in lines[0]


# --- property: no mutation of a valid envelope is ever accepted ---------------------------------------

@st.composite
def mutations(draw, envelope: bytes):
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "replace"]))
    data = bytearray(envelope)
    i = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[i:]
    elif kind == "insert":
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        del data[i:i + draw(st.integers(1, 8))]
    else:
        new = draw(st.binary(min_size=1, max_size=8))
        if bytes(data[i:i + len(new)]) == new:
            new = bytes(b ^ 0xFF for b in new)
        data[i:i + len(new)] = new
    return bytes(data)


def test_random_mutations_of_a_valid_envelope_are_refused_with_a_reason(operator):
    envelope = signed(operator, "load-model", {"card": "/opt/models/m.json", "instances": 2})
    board = verifier(operator, capacity=10)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutations(envelope))
    def check(mutated):
        if mutated == envelope:
            return
        verdict = board.verify(mutated)
        assert verdict.code in REFUSAL_CODES, verdict
        assert verdict.reason

    check()
    assert len(board.store) == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["args", "command", "command_id", "device", "expires_at", "issued_at", "key_id", "nonce"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=20),
                       st.binary(max_size=40), st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63), max_size=3)))
def test_a_changed_field_under_the_original_signature_is_refused(operator, field, value):
    envelope = signed(operator, device=FLEET)
    outer = msgpack.unpackb(envelope)
    fields = fields_of(envelope)
    if fields[field] == value and type(fields[field]) is type(value):
        return
    body = canonical_bytes(dict(fields, **{field: value}))
    verdict = verifier(operator).verify(msgpack.packb({"sig": outer["sig"], "signed": body, "v": 1}, use_bin_type=True))
    assert verdict.code in ("malformed", "unknown_key", "bad_signature"), verdict


def test_bench_sign_fuzz_refuses_everything_with_a_reason_and_keeps_no_state():
    out = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "sign", "--n", "20", "--fuzz", "300"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "accepted 0, refused without a reason 0, replay store entries 1" in out.stdout
    for code in ("malformed", "bad_signature", "unknown_key", "revoked_key", "wrong_device", "expired", "replayed"):
        assert code in out.stdout
    assert "verify forged" in out.stdout and "RSS before" in out.stdout
