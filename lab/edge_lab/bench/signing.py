"""``edge-agent bench sign``: what a signed command costs, and a fuzz of the board's verifier.

* Cost: the operator's ``sign`` and the board's ``Verifier.verify`` per command, each timed one
  call at a time and reported as the median (and p99) in microseconds: an accepted command (a
  fresh one each time, so every call goes the whole way through, replay store included), a forged
  one (the signature check fails: what a flood of forgeries costs the board), and a malformed one
  (refused before any cryptography).
* Fuzz: ``n`` envelopes that must all be refused, drawn from a seeded mix: random bytes, byte
  mutations of a valid envelope, fields changed under the original signature, properly signed
  commands for another board, expired or not yet valid, too long-lived, signed by a key the board
  does not know or has revoked, reused nonces. Reports the refusals by reason, how many were
  accepted (the figure must be 0), the replay store's size, and the process's resident memory
  before and after (VmRSS; a verifier that kept anything per refusal would grow).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import msgpack

from agent.ops.keys import Keyring, generate_key_pair, load_signing_key
from agent.ops.signing import FLEET, Verifier, canonical_bytes, sign

__all__ = ["bench_sign", "fuzz_verifier", "format_sign_report"]

DEVICE = "bench-board"


@contextlib.contextmanager
def _refusal_log_muted() -> Iterator[None]:
    """The refusals' log lines (at most 10 per 10 s) would interleave with the report."""
    signing_log = logging.getLogger("agent.ops.signing")
    level = signing_log.level
    signing_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        signing_log.setLevel(level)


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _keys(tmp: Path) -> dict:
    board = tmp / "board"
    board.mkdir()
    out = {}
    for name in ("operator", "stranger", "retired"):
        pair = generate_key_pair(tmp / "keys", name)
        out[name] = load_signing_key(pair.private_path)
        if name != "stranger":
            (board / pair.public_path.name).write_bytes(pair.public_path.read_bytes())
    (board / "revoked").write_text("retired\n")
    out["keyring"] = Keyring.from_dir(board)
    return out


def _per_call_us(calls: list[Callable[[], object]]) -> dict:
    times = []
    gc.disable()
    try:
        for call in calls:
            start = time.perf_counter_ns()
            call()
            times.append((time.perf_counter_ns() - start) / 1000.0)
    finally:
        gc.enable()
    times.sort()
    return {"median_us": statistics.median(times), "p99_us": times[int(0.99 * (len(times) - 1))], "n": len(times)}


def bench_sign(n: int = 2000) -> dict:
    """Median and p99 microseconds of sign, and of verify for accepted, forged and malformed commands."""
    with _refusal_log_muted(), tempfile.TemporaryDirectory() as tmp:
        keys = _keys(Path(tmp))
        key = keys["operator"]
        args = {"card": "/opt/edge-agent/models/mobilenet.json", "instances": 2}
        results = {"sign": _per_call_us([lambda: sign("load-model", args, DEVICE, key) for _ in range(n)])}
        board = Verifier(DEVICE, keys["keyring"], capacity=n + 1)
        fresh = [sign("load-model", args, DEVICE, key) for _ in range(n)]
        results["verify accepted"] = _per_call_us([lambda e=e: board.verify(e) for e in fresh])
        forged = bytearray(fresh[0])
        forged[10] ^= 1
        forged = bytes(forged)
        results["verify forged"] = _per_call_us([lambda: board.verify(forged)] * n)
        results["verify malformed"] = _per_call_us([lambda: board.verify(b"\x93\x01\x02")] * n)
        results["envelope_bytes"] = len(fresh[0])
    return results


def _fuzz_cases(keys: dict, rng: random.Random) -> tuple[list[Callable[[], bytes]], bytes]:
    key = keys["operator"]
    valid = sign("drain", {"timeout_s": 5}, DEVICE, key)
    outer = msgpack.unpackb(valid)
    fields = msgpack.unpackb(outer["signed"], raw=False)
    now_ms = int(time.time() * 1000)
    reused_nonce = b"R" * 16

    def random_bytes() -> bytes:
        return rng.randbytes(rng.randint(0, 400))

    def mutated() -> bytes:
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[i:i] = rng.randbytes(rng.randint(1, 6))
            else:
                del data[i:i + rng.randint(1, 6)]
        return bytes(data) if bytes(data) != valid else b""

    def changed_field() -> bytes:
        name = rng.choice(sorted(fields))
        value = rng.choice([None, True, -1, 2 ** 40, "x" * rng.randint(0, 80), rng.randbytes(16), {"a": 1}, [1]])
        try:
            body = canonical_bytes(dict(fields, **{name: value}))
        except ValueError:
            body = rng.randbytes(64)
        return msgpack.packb({"sig": outer["sig"], "signed": body, "v": 1}, use_bin_type=True)

    def bad_signature() -> bytes:
        sig = bytearray(outer["sig"])
        sig[rng.randrange(64)] ^= 1 << rng.randrange(8)
        return msgpack.packb({"sig": bytes(sig), "signed": outer["signed"], "v": 1}, use_bin_type=True)

    def other_device() -> bytes:
        return sign("status", {}, f"board-{rng.randrange(1000)}", key)

    def expired() -> bytes:
        return sign("status", {}, DEVICE, key, issued_at_ms=now_ms - 400_000, ttl_s=60)

    def not_yet_valid() -> bytes:
        return sign("status", {}, FLEET, key, issued_at_ms=now_ms + 600_000, ttl_s=60)

    def too_long() -> bytes:
        return sign("status", {}, DEVICE, key, ttl_s=3600)

    def unknown_key() -> bytes:
        return sign("status", {}, DEVICE, keys["stranger"])

    def revoked_key() -> bytes:
        return sign("status", {}, DEVICE, keys["retired"])

    def replayed() -> bytes:
        return sign("status", {}, DEVICE, key, nonce=reused_nonce)

    def wrong_context() -> bytes:               # signed without the command context: another use of the key
        body = outer["signed"]
        return msgpack.packb({"sig": key.private_key.sign(body), "signed": body, "v": 1}, use_bin_type=True)

    return [random_bytes, mutated, mutated, changed_field, bad_signature, other_device, expired,
            not_yet_valid, too_long, unknown_key, revoked_key, replayed, wrong_context], reused_nonce


def fuzz_verifier(n: int = 10_000, seed: int = 0) -> dict:
    """``n`` envelopes that must all be refused: refusals by code, accepted count, RSS before/after."""
    with _refusal_log_muted():
        return _fuzz(n, seed, random.Random(seed))


def _fuzz(n: int, seed: int, rng: random.Random) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        keys = _keys(Path(tmp))
        board = Verifier(DEVICE, keys["keyring"])
        cases, reused_nonce = _fuzz_cases(keys, rng)
        # The nonce that the replay cases reuse belongs to one accepted command first.
        first = board.verify(sign("status", {}, DEVICE, keys["operator"], nonce=reused_nonce))
        assert first.accepted, first.reason
        board.record(first.command.command_id, {"ok": True})
        envelopes = [rng.choice(cases)() for _ in range(n)]     # made first: RSS counts the verifier only
        codes: Counter[str] = Counter()
        accepted = empty_reason = 0
        gc.collect()
        rss_before = _rss_kib()
        checkpoints = []
        start = time.perf_counter()
        for i, envelope in enumerate(envelopes, 1):
            verdict = board.verify(envelope)
            codes[verdict.code] += 1
            if verdict.accepted or verdict.repeat:
                accepted += 1
            if not verdict.reason:
                empty_reason += 1
            if i % (n // 4 or 1) == 0:
                checkpoints.append(_rss_kib())
        elapsed = time.perf_counter() - start
        gc.collect()
        return {"n": n, "seed": seed, "codes": dict(codes.most_common()), "accepted": accepted,
                "without_reason": empty_reason, "store_entries": len(board.store),
                "rss_before_kib": rss_before, "rss_after_kib": _rss_kib(), "rss_checkpoints_kib": checkpoints,
                "seconds": elapsed, "us_per_envelope": elapsed / n * 1e6}


def format_sign_report(costs: dict, fuzz: dict) -> str:
    lines = [f"signed command envelope: {costs['envelope_bytes']} bytes (load-model with a card path)",
             f"{'per command':<20}{'median us':>12}{'p99 us':>10}{'n':>8}"]
    for name in ("sign", "verify accepted", "verify forged", "verify malformed"):
        row = costs[name]
        lines.append(f"{name:<20}{row['median_us']:>12.1f}{row['p99_us']:>10.1f}{row['n']:>8}")
    lines.append("")
    lines.append(f"fuzz: {fuzz['n']} malformed or forged envelopes (seed {fuzz['seed']}), verified in "
                 f"{fuzz['seconds']:.2f} s ({fuzz['us_per_envelope']:.0f} us each): "
                 f"accepted {fuzz['accepted']}, refused without a reason {fuzz['without_reason']}, "
                 f"replay store entries {fuzz['store_entries']}")
    for code, count in fuzz["codes"].items():
        lines.append(f"  {code:<16}{count:>7}")
    checkpoints = ", ".join(f"{kib / 1024:.1f}" for kib in fuzz["rss_checkpoints_kib"])
    lines.append(f"RSS before {fuzz['rss_before_kib'] / 1024:.1f} MiB, at each quarter {checkpoints}, "
                 f"after {fuzz['rss_after_kib'] / 1024:.1f} MiB")
    return "\n".join(lines)


# --- the same fuzz through a real broker to a real agent process ---------------------------------

def _proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _topic_command(envelope: bytes) -> str:
    """The command an envelope claims to be (its topic's last level), ``status`` when it names none
    that a topic may carry: a forger picks the topic, and the board must refuse either way."""
    from agent.ops.signing import COMMAND_PATTERN
    try:
        command = msgpack.unpackb(msgpack.unpackb(envelope)["signed"], raw=False)["command"]
    except Exception:
        return "status"
    return command if isinstance(command, str) and COMMAND_PATTERN.fullmatch(command) else "status"


def fuzz_agent(n: int = 10_000, seed: int = 0, window: int = 128, timeout_s: float = 300.0) -> dict:
    """The fuzz's ``n`` envelopes published to a real ``edge-agent run`` process (one demo model,
    ``[mqtt] subscribers = ["infer", "cmd"]``) through a local Mosquitto, each with its own
    correlation data, at most ``window`` unanswered at once (the agent's command queue holds 256;
    beyond, it answers ``busy`` at once, also a refusal with a reason). Counts the acks per
    correlation (each must come exactly once, none ``ok``), the codes, and the agent's resident
    memory before, at each quarter and after."""
    import subprocess
    import sys
    import threading

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.ops.signing import decode_ack
    from agent.transport.paho_client import connect, make_client
    from edge_lab.broker import LocalBroker

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        tmp = Path(tmp)
        keys = _keys(tmp)
        config = tmp / "agent.toml"
        config.write_text(f'config_version = 1\n[agent]\ndevice = "{DEVICE}"\nworkers = 1\n'
                          f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nsubscribers = ["infer", "cmd"]\n'
                          f'[control]\nkeyring = "{tmp / "board"}"\n'
                          f'[[models]]\nname = "mobilenet_digits"\ncard = "demo:mobilenet_digits"\n')
        log_path = tmp / "agent.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                    stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while "serving" not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"edge-agent run did not start serving: {log_path.read_text()}")
                time.sleep(0.1)
            cases, reused_nonce = _fuzz_cases(keys, rng)
            first = sign("status", {}, DEVICE, keys["operator"], nonce=reused_nonce)
            envelopes = [first] + [rng.choice(cases)() for _ in range(n)]
            acks: dict[int, list[dict]] = {}
            cond = threading.Condition()
            client = make_client(f"bench-sign-fuzz-{seed}")
            reply_topic = f"bench/sign-fuzz/{seed}/acks"

            def on_message(client, userdata, message) -> None:
                index = int(message.properties.CorrelationData)
                ack = decode_ack(message.payload)
                with cond:
                    acks.setdefault(index, []).append(ack)
                    cond.notify_all()

            client.on_message = on_message
            subscribed = threading.Event()
            client.on_subscribe = lambda *a: subscribed.set()
            connect(client, broker.host, broker.port)
            client.subscribe(reply_topic, qos=1)
            if not subscribed.wait(10):
                raise RuntimeError("the broker did not acknowledge the subscription")

            def publish(index: int) -> None:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = reply_topic
                props.CorrelationData = str(index).encode()
                envelope = envelopes[index]
                client.publish(f"edge/v1/{DEVICE}/cmd/{_topic_command(envelope)}", envelope, qos=1, properties=props)

            publish(0)                                      # the accepted command whose nonce is replayed
            with cond:
                if not cond.wait_for(lambda: 0 in acks, 30):
                    raise RuntimeError("no ack for the first (valid) command")
            gc.collect()
            rss_before = _proc_rss_kib(proc.pid)
            checkpoints = []
            start = time.perf_counter()
            stop_at = time.monotonic() + timeout_s
            for index in range(1, n + 1):
                with cond:
                    cond.wait_for(lambda: index - len(acks) < window or time.monotonic() > stop_at, 10)
                publish(index)
                if index % (n // 4 or 1) == 0:
                    checkpoints.append(_proc_rss_kib(proc.pid))
            with cond:
                cond.wait_for(lambda: len(acks) >= n + 1, max(1.0, stop_at - time.monotonic()))
            elapsed = time.perf_counter() - start
            time.sleep(0.5)                                 # a second ack would show up now
            rss_after = _proc_rss_kib(proc.pid)
            client.disconnect()
            client.loop_stop()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        with cond:
            fuzzed = {i: acks.get(i, []) for i in range(1, n + 1)}
        codes = Counter(a[0]["code"] for a in fuzzed.values() if a)
        return {"n": n, "seed": seed, "window": window, "codes": dict(codes.most_common()),
                "first_ack": acks[0][0]["code"],
                "accepted": sum(1 for a in fuzzed.values() if a and a[0]["ok"]),
                "without_reason": sum(1 for a in fuzzed.values() if a and not a[0]["reason"]),
                "unanswered": sum(1 for a in fuzzed.values() if not a),
                "answered_twice": sum(1 for a in fuzzed.values() if len(a) > 1),
                "rss_before_kib": rss_before, "rss_after_kib": rss_after, "rss_checkpoints_kib": checkpoints,
                "seconds": elapsed, "agent_exit": proc.returncode}


def format_agent_fuzz(fuzz: dict) -> str:
    lines = [f"fuzz through the broker: {fuzz['n']} envelopes (seed {fuzz['seed']}) to an edge-agent run process, "
             f"at most {fuzz['window']} unanswered, in {fuzz['seconds']:.1f} s: accepted {fuzz['accepted']}, "
             f"refused without a reason {fuzz['without_reason']}, unanswered {fuzz['unanswered']}, "
             f"answered twice {fuzz['answered_twice']} (the valid first command: {fuzz['first_ack']})"]
    for code, count in fuzz["codes"].items():
        lines.append(f"  {code:<16}{count:>7}")
    checkpoints = ", ".join(f"{kib / 1024:.1f}" for kib in fuzz["rss_checkpoints_kib"])
    lines.append(f"agent RSS before {fuzz['rss_before_kib'] / 1024:.1f} MiB, at each quarter {checkpoints}, "
                 f"after {fuzz['rss_after_kib'] / 1024:.1f} MiB; agent exit {fuzz['agent_exit']}")
    return "\n".join(lines)
