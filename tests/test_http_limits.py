"""The HTTP intake under clients that misbehave (issue 21), over real sockets against a real agent:
no connection is held for free (header, body and idle timeouts), the header limit holds however the
bytes arrive, deep JSON is the client's error, open connections are bounded with a 503 beyond, and
running out of descriptors in accept backs off and logs once instead of a traceback per connection.

Timeouts are set small here so the tests are quick; every wait on the server is bounded generously."""
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from agent.config import CONFIG_VERSION, parse_config
from agent.service import Service

MODEL = "mobilenet_digits"
TIMEOUT_S = 0.6               # header, body and idle timeouts of the main fixture
HEAD_LIMIT = 4096
WAIT_S = 15.0                 # the most any read here waits for the server


def make_config(**http):
    return parse_config({
        "config_version": CONFIG_VERSION,
        "agent": {"device": "limits-board", "workers": 1},
        "mqtt": {"enabled": False},
        "http": {"enabled": True, "port": 0, **http},
        "models": [{"name": MODEL, "card": f"demo:{MODEL}"}],
    })


@pytest.fixture(scope="module")
def service():
    with Service(make_config(header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S, idle_timeout_s=TIMEOUT_S,
                             max_header_bytes=HEAD_LIMIT)) as svc:
        yield svc


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset after its reply counts as closed)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response on a connection that stays open: (status line, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0], body


def status_of(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(service):
    with connect(service.http.port) as sock:
        sock.sendall(LIVE)
        assert read_response(sock)[0] == b"HTTP/1.1 200 OK"
        t0 = time.monotonic()
        assert read_until_closed(sock) == b""                # closed quietly, as servers do
        assert time.monotonic() - t0 >= TIMEOUT_S * 0.9      # not before the timeout
    with connect(service.http.port) as sock:                 # a connection that never sends a byte
        assert read_until_closed(sock) == b""


def test_a_head_sent_a_byte_at_a_time_gets_408_after_the_header_timeout(service):
    """A slow client that keeps sending (a byte every 50 ms) gets no more time: the deadline runs
    from the head's first byte, not from the last read."""
    head = LIVE[:-2]                                         # never complete
    with connect(service.http.port) as sock:
        stop = threading.Event()

        def dribble():
            for byte in head:
                if stop.is_set():
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)

        sender = threading.Thread(target=dribble)
        sender.start()
        try:
            data = read_until_closed(sock)
        finally:
            stop.set()
            sender.join()
    assert status_of(data) == b"HTTP/1.1 408 Request Timeout", data
    assert b"request line and headers did not arrive within" in data


@pytest.mark.parametrize("chunk", [None, 100], ids=["one send", "sends of 100 bytes"])
def test_a_head_over_the_limit_is_431_however_it_arrives(service, chunk):
    head = b"GET /v2 HTTP/1.1\r\nX-Filler: " + b"a" * (2 * HEAD_LIMIT) + b"\r\n\r\n"
    with connect(service.http.port) as sock:
        if chunk is None:
            sock.sendall(head)
        else:
            try:
                for k in range(0, len(head), chunk):
                    sock.sendall(head[k:k + chunk])
            except OSError:          # refused before the last bytes: the reply is what counts
                pass
        data = read_until_closed(sock)
    assert status_of(data) == b"HTTP/1.1 431 Request Header Fields Too Large", data
    assert f"exceed {HEAD_LIMIT} bytes".encode() in data
    assert b"Connection: close" in data


def test_a_truncated_body_held_open_gets_408_after_the_body_timeout(service):
    with connect(service.http.port) as sock:
        sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n".encode() + b"{" * 10)
        t0 = time.monotonic()
        data = read_until_closed(sock)
    assert status_of(data) == b"HTTP/1.1 408 Request Timeout", data
    assert b"the body did not arrive within" in data
    assert time.monotonic() - t0 >= TIMEOUT_S * 0.9


def test_a_request_that_runs_longer_than_the_timeouts_still_gets_its_reply(service, digits):
    """The deadlines cover waiting for the client, never the agent's own work."""
    frames, labels = digits
    header = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": frames[0].nbytes}}],
                         "parameters": {"slo_ms": 60_000}}).encode()
    body = header + frames[3:4].tobytes()
    request = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
               f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + body
    model = service.agent.models[MODEL]
    backend = model.backends[0]
    real_run = backend.run

    def slow_run(batch):
        time.sleep(3 * TIMEOUT_S)
        return real_run(batch)

    backend.run = slow_run
    try:
        with connect(service.http.port) as sock:
            sock.sendall(request)
            status, reply = read_response(sock)
    finally:
        backend.run = real_run
    assert status == b"HTTP/1.1 200 OK", reply
    assert int(np.argmax(json.loads(reply)["outputs"][0]["data"])) == labels[3]


@pytest.mark.parametrize("body", [b"[" * 5000 + b"]" * 5000,
                                  b'{"inputs":[{"name":"frames","shape":[1],"datatype":"UINT8","parameters":'
                                  + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}]}"],
                         ids=["bare arrays", "objects inside a request"])
def test_json_nested_5000_deep_is_400_naming_the_nesting(service, body):
    with connect(service.http.port) as sock:
        sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status, reply = read_response(sock)
        assert status == b"HTTP/1.1 400 Bad Request", reply
        assert "bad_request: the request's JSON nests arrays or objects deeper" in json.loads(reply)["error"]
        sock.sendall(LIVE)                                    # the connection serves on
        assert read_response(sock)[0] == b"HTTP/1.1 200 OK"


def test_connections_beyond_the_bound_get_503_while_those_under_it_are_served():
    with Service(make_config(max_connections=3, header_timeout_s=30, idle_timeout_s=30)) as svc:
        port = svc.http.port
        held = [connect(port) for _ in range(3)]
        try:
            for sock in held:                                 # each accepted and counted
                sock.sendall(LIVE)
                assert read_response(sock)[0] == b"HTTP/1.1 200 OK"
            with connect(port) as extra:
                extra.sendall(LIVE)
                data = read_until_closed(extra)
            assert status_of(data) == b"HTTP/1.1 503 Service Unavailable", data
            assert b"rejected: too many connections (3 open)" in data and b"Connection: close" in data
            held[1].sendall(b"GET /v2 HTTP/1.1\r\n\r\n")      # under the bound: still served
            status, body = read_response(held[1])
            assert status == b"HTTP/1.1 200 OK" and json.loads(body)["name"] == "edge-agent"
            held.pop().close()                                # a place frees: a new client is served
            deadline = time.monotonic() + WAIT_S
            while len(svc.http._connections) >= 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            with connect(port) as fresh:
                fresh.sendall(LIVE)
                assert read_response(fresh)[0] == b"HTTP/1.1 200 OK"
        finally:
            for sock in held:
                sock.close()


# A child process, so that its descriptor table can be filled without touching the test's.
_EMFILE_CHILD = textwrap.dedent("""
    import logging, os, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from agent.config import parse_config
    from agent.service import Service
    service = Service(parse_config({"config_version": 1, "agent": {"workers": 1}, "mqtt": {"enabled": False},
                                    "http": {"enabled": True, "port": 0},
                                    "models": [{"name": "mobilenet_digits", "card": "demo:mobilenet_digits"}]}))
    print(service.http.port, flush=True)
    sys.stdin.readline()
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print(len(held), flush=True)
    sys.stdin.readline()
    for fd in held:
        os.close(fd)
    print("freed", flush=True)
    sys.stdin.readline()
    service.close()
""")


def _low_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_out_of_descriptors_in_accept_backs_off_logs_once_and_serves_when_they_free():
    proc = subprocess.Popen([sys.executable, "-c", _EMFILE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_low_nofile)
    clients = []
    try:
        port = int(proc.stdout.readline())
        proc.stdin.write("fill\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) > 0                # the child's descriptors are all taken
        for _ in range(20):                                   # the kernel completes these; accept cannot
            sock = connect(port)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n")
            clients.append(sock)
        time.sleep(1.5)                                       # several back-offs pass
        proc.stdin.write("free\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "freed"
        for sock in clients:                                  # nobody was lost: each served once accepted
            assert status_of(read_until_closed(sock)) == b"HTTP/1.1 200 OK"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=30)
    finally:
        for sock in clients:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "EMFILE" in line]
    assert len(lines) == 1, err
    assert "HTTP accept: EMFILE" in lines[0] and "not accepting for" in lines[0]


def test_edge_agent_run_raises_its_open_file_limit_to_the_hard_limit(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit here is {hard}: nothing to raise")
    config_file = tmp_path / "agent.toml"
    config_file.write_text('config_version = 1\n[agent]\nworkers = 1\n'
                           '[[models]]\nname = "mobilenet_digits"\ncard = "demo:mobilenet_digits"\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config_file), "--no-mqtt",
                             "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_low_nofile)
    try:
        assert "serving" in proc.stdout.readline()
        limits = open(f"/proc/{proc.pid}/limits").read()
        soft, hard_seen = re.search(r"Max open files\s+(\S+)\s+(\S+)", limits).groups()
        assert soft == hard_seen and soft != "256", limits
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_head_deadlines_of_connections_opened_together_are_spread(service):
    """Connections opened in one burst do not all time out in one sweep (their clients would all
    reconnect at once, and a new client wait behind the wave): each head's deadline falls between
    1 - HEAD_JITTER and all of the header timeout, spread over that range."""
    from agent.intake.http import HEAD_JITTER
    intake = service.http
    deadlines = [intake.head_deadline(100.0) - 100.0 for _ in range(2000)]
    timeout = intake.header_timeout_s
    assert all((1 - HEAD_JITTER) * timeout <= d <= timeout for d in deadlines)
    assert max(deadlines) - min(deadlines) > 0.9 * HEAD_JITTER * timeout
