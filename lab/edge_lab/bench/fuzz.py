"""``edge-agent bench fuzz``: thousands of fuzzed requests on each intake of an agent in its own process.

Issue 21's targets, measured: zero crashes, zero dead threads, every request with a response topic
answered exactly once, no ``internal`` for bad input, and the agent's RSS within 10 MB of where it
started once the run is over. The cases come from :mod:`edge_lab.fuzz` (the generators the tests
use), drawn from one seeded ``random.Random``, so a run replays exactly.

The agent runs in a process of its own (``python -m edge_lab.bench.fuzz --serve``: the demo config
behind :class:`agent.service.Service`, as ``edge-agent run`` serves it), so its RSS is its own
(``/proc/<pid>/status``), and it answers a line on stdin with what only it can see: how many
requests it counted unanswerable, and which of its threads are alive.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

RSS_TARGET_MB = 10.0
#: Answerable MQTT requests in flight at once: well inside Mosquitto's per-client queue (1000), so
#: the broker never drops a request or a reply for being behind.
MQTT_WINDOW = 64
HTTP_CONNECTIONS = 4
SETTLE_S = 2.0


# --- the agent's process --------------------------------------------------------------------------

def _serve(mqtt_host: str | None, mqtt_port: int) -> int:
    """Serve the fuzz config until stdin says ``stop``; ``stats`` prints one JSON line."""
    import logging

    from agent.service import Service
    from edge_lab.fuzz import fuzz_config
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with Service(fuzz_config(mqtt_host, mqtt_port)) as service:
        threads = [t for t in threading.enumerate() if t is not threading.main_thread()]
        print(json.dumps({"ready": True, "http_port": service.http.port}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                print(json.dumps({
                    "unanswerable": service.mqtt.unanswerable if service.mqtt is not None else 0,
                    "threads": len(threads), "dead": [t.name for t in threads if not t.is_alive()],
                }), flush=True)
            elif command == "stop":
                break
    return 0


class AgentProcess:
    """The agent under test, in its own process; its log goes to a file (``log_path``)."""

    def __init__(self, mqtt_host: str | None, mqtt_port: int) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="edge-agent-fuzz-", suffix=".log", delete=False)
        self.log_path = self.log.name
        args = [sys.executable, "-m", "edge_lab.bench.fuzz", "--serve", mqtt_host or "", str(mqtt_port)]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True)
        ready = self._read()
        self.http_port = ready["http_port"]
        self.pid = self.process.pid

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent exited ({self.process.wait()}); its log: {self.log_path}")
        return json.loads(line)

    def stats(self) -> dict:
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return self._read()

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc/<pid>/status")

    def stop(self) -> int:
        if self.alive():
            try:
                self.process.stdin.write("stop\n")
                self.process.stdin.flush()
            except OSError:
                pass
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


# --- the runs ---------------------------------------------------------------------------------------

def _progress(label: str, done: int, total: int, started: float, rss_mb) -> None:
    print(f"  {label}: {done}/{total} ({time.monotonic() - started:.0f} s, agent RSS {rss_mb():.1f} MB)", flush=True)


def _on_bar(progress, base: int):
    """:func:`_progress` for a run with a bar (an ``agent.progress.Progress`` over every case of the
    run, this intake's from ``base`` on): the same line above the bar, and the bar moved on."""
    def report(label: str, done: int, total: int, started: float, rss_mb) -> None:
        progress.write(f"  {label}: {done}/{total} ({time.monotonic() - started:.0f} s, agent RSS {rss_mb():.1f} MB)",
                       sys.stdout)
        progress.advance_to(base + done, f"{label} {done}/{total}")
    return report


def fuzz_mqtt(host: str, port: int, device: str, count: int, rng: random.Random, rss_mb, report=_progress):
    from edge_lab.fuzz import MAX_PAYLOAD, MqttFuzzer, Tally, mqtt_case
    fuzzer = MqttFuzzer(host, port, device, f"fuzz-bench-{os.getpid()}")
    tally, sent = Tally(), []
    started = time.monotonic()
    try:
        outstanding: list[str] = []
        for n in range(count):
            case = mqtt_case(rng, MAX_PAYLOAD)
            fuzzer.send(case, n)
            sent.append((case, n))
            if case.answerable:
                outstanding.append(fuzzer.topic_of(case, n))
            if len(outstanding) >= MQTT_WINDOW:
                fuzzer.wait_for(outstanding[0], 30)
                outstanding = [t for t in outstanding if t not in fuzzer.replies]
            if (n + 1) % 1000 == 0:
                report("mqtt", n + 1, count, started, rss_mb)
        for topic in outstanding:
            fuzzer.wait_for(topic, 30)
        time.sleep(SETTLE_S)            # duplicates, were there any, arrive meanwhile
        for case, n in sent:
            fuzzer.check(case, n, tally)
        if fuzzer.disconnects:
            tally.problem(f"the broker dropped the fuzzer's own connection {fuzzer.disconnects} times")
    finally:
        fuzzer.close()
    return tally, time.monotonic() - started


def fuzz_http(port: int, count: int, rng: random.Random, rss_mb, report=_progress):
    from edge_lab.fuzz import MAX_PAYLOAD, Tally, check_http, http_case, http_exchange
    cases = [http_case(rng, MAX_PAYLOAD) for _ in range(count)]
    tally = Tally()
    started = time.monotonic()

    def exchange(case):
        try:
            return http_exchange("127.0.0.1", port, case)
        except OSError as exc:                 # refused, reset before anything came back
            return exc, True

    with ThreadPoolExecutor(HTTP_CONNECTIONS) as pool:
        for n, (case, outcome) in enumerate(zip(cases, pool.map(exchange, cases))):
            responses, closed = outcome
            if isinstance(responses, OSError):
                tally.problem(f"http #{n} {case.kind}: {type(responses).__name__}: {responses}")
                responses = []
            check_http(case, n, responses, closed, tally)
            if (n + 1) % 1000 == 0:
                report("http", n + 1, count, started, rss_mb)
    return tally, time.monotonic() - started


def _warm_up(agent: AgentProcess, broker, device: str) -> None:
    """Valid requests on each intake before RSS is first read, many at once so that batches of every
    size form: the runtimes allocate their arenas per batch shape, which is start-up, not a leak."""
    from edge_lab.fuzz import HttpCase, HttpExpect, http_exchange
    body = (b'{"inputs":[{"name":"frames","datatype":"UINT8","shape":[1,64,64,3],'
            b'"parameters":{"binary_data_size":12288}}]}')
    for model in ("mobilenet_digits", "resnet_digits"):
        data = (b"POST /v2/models/%s/infer HTTP/1.1\r\nContent-Length: %d\r\nInference-Header-Content-Length: %d"
                b"\r\n\r\n" % (model.encode(), len(body) + 12288, len(body)) + body + bytes(12288))
        case = HttpCase("warm", data, [HttpExpect("POST", frozenset({200}))])
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: http_exchange("127.0.0.1", agent.http_port, case), range(400)))
    if broker is not None:
        import numpy as np

        from agent.client import InferenceClient
        client = InferenceClient(broker.host, broker.port, device, f"fuzz-warm-{os.getpid()}")
        try:
            for model in ("mobilenet_digits", "resnet_digits"):
                for _ in range(20):
                    client.infer(model, {"frames": np.zeros((64, 64, 3), np.uint8)}, slo_ms=5000)
        finally:
            client.client.disconnect()
            client.client.loop_stop()


def run_fuzz(count: int, seed: int, intakes: tuple[str, ...], progress=None) -> dict:
    """Fuzz an agent process on ``intakes`` with ``count`` requests each; returns the figures and
    whether each target held. ``progress``: a bar over ``count`` cases per intake (its lines above it)."""
    from edge_lab.broker import LocalBroker
    broker = LocalBroker().start() if "mqtt" in intakes else None
    device = "fuzz-board"
    results: dict = {"count": count, "seed": seed, "intakes": {}}
    agent = None
    try:
        agent = AgentProcess(broker.host if broker else None, broker.port if broker else 0)
        try:
            _warm_up(agent, broker, device)
            time.sleep(SETTLE_S)
            results["rss_before_mb"] = agent.rss_mb()
            rng = random.Random(seed)
            for k, intake in enumerate(intakes):
                line = f"fuzzing {intake}: {count} requests (seed {seed})"
                report = _progress
                if progress is None:
                    print(line, flush=True)
                else:
                    progress.write(line, sys.stdout)
                    report = _on_bar(progress, k * count)
                before = agent.stats()["unanswerable"]
                if intake == "mqtt":
                    tally, seconds = fuzz_mqtt(broker.host, broker.port, device, count, rng, agent.rss_mb, report)
                else:
                    tally, seconds = fuzz_http(agent.http_port, count, rng, agent.rss_mb, report)
                unanswerable = agent.stats()["unanswerable"] - before
                results["intakes"][intake] = {"tally": tally, "seconds": seconds, "unanswerable": unanswerable,
                                              "rss_mb": agent.rss_mb()}
            time.sleep(SETTLE_S)
            results["rss_after_mb"] = agent.rss_mb()
            stats = agent.stats()
            results["threads"], results["dead_threads"] = stats["threads"], stats["dead"]
            results["agent_alive"] = agent.alive()
        finally:
            results["agent_exit"] = agent.stop()
            results["agent_log"] = agent.log_path
    finally:
        if broker is not None:
            broker.close()
    return results


def targets(results: dict) -> dict[str, bool]:
    """Issue 21's targets, each held or not."""
    held = {"agent alive, exit 0": results.get("agent_alive", False) and results.get("agent_exit") == 0,
            "no dead threads": not results.get("dead_threads", ["?"]),
            f"RSS within {RSS_TARGET_MB:g} MB": abs(results["rss_after_mb"] - results["rss_before_mb"]) <= RSS_TARGET_MB}
    for intake, run in results["intakes"].items():
        tally = run["tally"]
        held[f"{intake}: every request answered exactly once"] = tally.replies[0] == 0 and tally.replies[2] == 0
        held[f"{intake}: no internal / 500"] = tally.codes["internal"] == 0 and tally.codes[500] == 0
        held[f"{intake}: every answer as expected"] = not tally.problems
        if intake == "mqtt":
            held["mqtt: unanswerable counted = expected"] = run["unanswerable"] == tally.unanswerable_expected
    return held


def format_fuzz(results: dict) -> str:
    lines = [f"edge-agent bench fuzz: {results['count']} requests per intake, seed {results['seed']}"]
    for intake, run in results["intakes"].items():
        tally = run["tally"]
        lines.append(f"\n{intake}: {tally.cases} cases in {run['seconds']:.1f} s "
                     f"({tally.cases / max(run['seconds'], 1e-9):.0f}/s)")
        lines.append(f"  answers per request: 0: {tally.replies[0]}, 1: {tally.replies[1]}, >1: {tally.replies[2]}")
        if intake == "mqtt":
            lines.append(f"  unanswerable (no or wildcard response topic): counted by the agent {run['unanswerable']}, "
                         f"expected {tally.unanswerable_expected}")
        codes = sorted(tally.codes.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0])))
        lines.append("  answers: " + ", ".join(f"{code}: {n}" for code, n in codes))
        lines.append("  cases by kind: " + ", ".join(f"{kind}: {n}" for kind, n in sorted(tally.kinds.items())))
        lines.append(f"  agent RSS right after: {run['rss_mb']:.1f} MB")
        if tally.problems:
            # "http #15 malformed_head request 0: ..." -> malformed_head
            by_kind = Counter(problem.split()[2].rstrip(":") for problem in tally.problems)
            lines.append(f"  problems: {len(tally.problems)}{'+' if len(tally.problems) >= 1000 else ''} ("
                         + ", ".join(f"{kind}: {n}" for kind, n in by_kind.most_common()) + "); the first of each:")
            for kind in by_kind:
                first = next(problem for problem in tally.problems if problem.split()[2].rstrip(":") == kind)
                lines.append(f"    {first[:300]}")
    lines.append(f"\nagent RSS: before {results['rss_before_mb']:.1f} MB, after {results['rss_after_mb']:.1f} MB "
                 f"(after a {SETTLE_S:g} s settle; {results['rss_after_mb'] - results['rss_before_mb']:+.1f} MB)")
    lines.append(f"agent threads: {results['threads'] - len(results['dead_threads'])} of {results['threads']} alive"
                 + (f" (dead: {results['dead_threads']})" if results["dead_threads"] else ""))
    lines.append(f"agent log: {results['agent_log']}")
    lines.append("\ntargets:")
    lines += [f"  {'held  ' if ok else 'BROKEN'} {name}" for name, ok in targets(results).items()]
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    sys.exit(_serve(sys.argv[2] or None, int(sys.argv[3])))
