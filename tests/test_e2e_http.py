"""End to end over a real socket: tritonclient.http (and raw HTTP where a client library would not
send what we test) against the agent's Open Inference Protocol intake, with the real demo models."""
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import agent
from agent.config import CONFIG_VERSION, parse_config
from agent.intake.http import HttpIntake
from agent.models.digits import frames_from_digits, load_test_set
from agent.service import Service

LIMIT = 64 * 1024
MODEL = "mobilenet_digits"
NO_ADMISSION = "mobilenet_no_admission"    # same network; admission off, so a hopeless request is shed instead


def make_config(**agent_fields):
    return parse_config({
        "config_version": CONFIG_VERSION,
        "agent": {"device": "http-board", "workers": 2, "max_payload_bytes": LIMIT, **agent_fields},
        "mqtt": {"enabled": False},
        "http": {"enabled": True, "port": 0},
        "models": [{"name": MODEL, "card": "demo:mobilenet_digits", "instances": 2},
                   {"name": NO_ADMISSION, "card": "demo:mobilenet_digits",
                    "batching": {"rule": "deadline_aware", "admission": False}}],
    })


@pytest.fixture(scope="module")
def service():
    with Service(make_config()) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    with triton.InferenceServerClient(f"127.0.0.1:{service.http.port}") as c:
        yield c


def frame_input(frames, binary=True, datatype="UINT8"):
    tensor = triton.InferInput("frames", list(frames.shape), datatype)
    tensor.set_data_from_numpy(frames, binary_data=binary)
    return tensor


def raw_exchange(port, data: bytes, timeout=5.0) -> bytes:
    """Send bytes on a fresh connection; return everything until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Consecutive HTTP responses on one connection: (status line, body) each, by Content-Length."""
    responses = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        responses.append((lines[0], data[:length]))
        data = data[length:]
    return responses


def server_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# --- health and metadata ------------------------------------------------------------------------

def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("no_such_model") and not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] == "edge-agent" and server["version"] == agent.__version__
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta == client.get_model_metadata(MODEL, "1")
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "frames", "datatype": "UINT8", "shape": [-1, 64, 64, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [64, 64, 3]


# --- inference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_the_in_process_agent(service, client, digits, binary):
    frames, labels = digits
    correct = 0
    for i in range(40):
        result = client.infer(MODEL, [frame_input(frames[i:i + 1], binary)], request_id=f"r{i}",
                              outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
        logits = result.as_numpy("logits")
        assert logits.dtype == np.float32 and logits.shape == (1, 10)
        expected = service.agent.infer(MODEL, {"frames": frames[i]}, slo_ms=5000).outputs["logits"]
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
        response = result.get_response()
        assert response["id"] == f"r{i}" and response["model_name"] == MODEL
        assert set(response["parameters"]) == {"queue_ms", "compute_ms", "total_ms", "batch_size", "served_by"}
        assert response["parameters"]["served_by"] == "http-board"     # computed here: no split
        correct += int(np.argmax(logits)) == labels[i]
    assert correct >= 36


def test_a_request_of_several_rows_is_answered_row_by_row(service, client, digits):
    frames, labels = digits
    result = client.infer(MODEL, [frame_input(frames[:4])])      # no outputs named: all, binary
    logits = result.as_numpy("logits")
    assert logits.shape == (4, 10)
    for row in range(4):
        expected = service.agent.infer(MODEL, {"frames": frames[row]}, slo_ms=5000).outputs["logits"][0]
        np.testing.assert_allclose(logits[row], expected, rtol=1e-5, atol=1e-6)


def test_compressed_request_and_accept_encoding_do_not_compress_the_reply(client, digits):
    frames, labels = digits
    result = client.infer(MODEL, [frame_input(frames[7:8])], request_compression_algorithm="gzip",
                          response_compression_algorithm="gzip")
    assert int(np.argmax(result.as_numpy("logits"))) == labels[7]


def test_timeout_and_slo_ms_parameters_set_the_deadline(client, digits):
    frames, _ = digits
    tensor = frame_input(frames[:1])
    assert client.infer(MODEL, [tensor], timeout=5_000_000).as_numpy("logits").shape == (1, 10)   # 5 s, in us
    assert client.infer(MODEL, [tensor], parameters={"slo_ms": 5000}).as_numpy("logits").shape == (1, 10)
    for kwargs in ({"timeout": 1}, {"parameters": {"slo_ms": 0.001}}):
        error = server_error(lambda: client.infer(MODEL, [tensor], **kwargs))
        assert error.status() == "429", error
        assert error.message().startswith("rejected: refused by admission control:")
        assert "deadline cannot be met" in error.message()
    # Admission off: the request is accepted and then shed, hopeless, before it runs.
    error = server_error(lambda: client.infer(NO_ADMISSION, [tensor], parameters={"slo_ms": 0.001}))
    assert error.status() == "504" and error.message().startswith("deadline_missed: ")


# --- errors -------------------------------------------------------------------------------------

def test_unknown_model(client, digits):
    frames, _ = digits
    error = server_error(lambda: client.infer("no_such_model", [frame_input(frames[:1])]))
    assert error.status() == "404"
    assert error.message() == f"unknown_model: no model 'no_such_model' is loaded; loaded: {sorted([MODEL, NO_ADMISSION])}"
    assert server_error(lambda: client.get_model_metadata("no_such_model")).status() == "404"
    assert server_error(lambda: client.get_model_metadata(MODEL, "2")).status() == "404"


def test_wrong_datatype_and_shape(client, digits):
    frames, _ = digits
    error = server_error(lambda: client.infer(MODEL, [frame_input(frames[:1].astype(np.float32), datatype="FP32")]))
    assert error.status() == "400"
    assert error.message().startswith("invalid_input: inputs.frames.datatype: expected UINT8, got 'FP32'")
    error = server_error(lambda: client.infer(MODEL, [frame_input(frames[:1, :32])]))
    assert error.status() == "400"
    assert error.message().startswith("invalid_input: inputs.frames.shape: expected [-1, 64, 64, 3]")
    assert "got [1, 32, 64, 3]" in error.message()


def test_bad_json_gets_400_and_the_connection_serves_on(service, digits):
    frames, labels = digits
    connection = http.client.HTTPConnection("127.0.0.1", service.http.port, timeout=5)
    connection.request("POST", f"/v2/models/{MODEL}/infer", body=b'{"inputs": [', headers={
        "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["error"].startswith("bad_request: the request's JSON does not parse")
    body = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                   "data": frames[2].ravel().tolist()}]})
    connection.request("POST", f"/v2/models/{MODEL}/infer", body=body)   # same keep-alive connection
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "application/json"
    logits = json.loads(response.read())["outputs"][0]["data"]
    assert int(np.argmax(logits)) == labels[2]
    connection.close()


def test_oversize_body_is_refused_from_its_content_length_alone(service):
    # Only the headers are sent: the 413 must come without the server waiting for (reading) the body.
    reply = raw_exchange(service.http.port, f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                                            f"Content-Length: {LIMIT + 1}\r\n\r\n".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head
    assert json.loads(body)["error"] == f"too_large: Content-Length of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes"


def test_unknown_path_method_and_malformed_http(service):
    port = service.http.port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for path in ("/v2/nothing", "/metrics", f"/v2/models/{MODEL}/stats"):
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 404, path
        assert json.loads(response.read())["error"].startswith(f"bad_request: no endpoint GET {path}")
    connection.request("GET", f"/v2/models/{MODEL}/infer")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    assert "method GET is not allowed" in json.loads(response.read())["error"]
    connection.request("HEAD", "/v2/health/ready")
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b""
    connection.close()
    assert raw_exchange(port, b"HELLO\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_exchange(port, f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 411 ")
    assert raw_exchange(port, f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                              f"0\r\n\r\n".encode()).startswith(b"HTTP/1.1 411 ")


def test_a_repeated_head_is_routed_and_its_body_checked_every_time(service, digits):
    # Heads are parsed and routed once per distinct head: the same head on another connection, and
    # on this one after an error, must reach the same model; a body that changed under the same head
    # is still checked; the same path with another method or model is routed on its own.
    frames, labels = digits
    port = service.http.port

    def infer_bytes(model, frame, datatype="UINT8"):
        header = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": datatype,
                                         "parameters": {"binary_data_size": frame.nbytes}}]}).encode()
        body = header + frame.tobytes()
        return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + body

    good = [infer_bytes(MODEL, frames[k]) for k in range(3)]
    assert len({request.partition(b"\r\n\r\n")[0] for request in good}) == 1     # one head for all three
    bad_dtype = infer_bytes(MODEL, frames[0].astype(np.int8), datatype="INT8")
    other_model = infer_bytes(NO_ADMISSION, frames[1])
    for _ in range(2):     # the second pass finds every head cached
        reply = raw_exchange(port, good[0] + bad_dtype + good[1] + other_model + good[2]
                             + f"GET /v2/models/{MODEL}/infer HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        responses = split_responses(reply)
        assert [status.split(b" ")[1] for status, _ in responses] == [b"200", b"400", b"200", b"200", b"200", b"405"]
        for (_, body), k in zip([responses[0], responses[2], responses[4]], range(3)):
            assert int(np.argmax(json.loads(body)["outputs"][0]["data"])) == labels[k]
        assert b"inputs.frames.datatype" in responses[1][1]
        assert b'"model_name":"mobilenet_no_admission"' in responses[3][1]


def test_pipelined_requests_are_answered_in_order_and_expect_continue(service, digits):
    frames, _ = digits
    header = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 64 * 64 * 3}}]}).encode()
    body = header + frames[0].tobytes()
    infer = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
             f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + body
    reply = raw_exchange(service.http.port, infer + b"GET /v2/health/live HTTP/1.1\r\n\r\n" + infer
                         + b"GET /v2 HTTP/1.1\r\nConnection: close\r\n\r\n")
    responses = split_responses(reply)
    assert [status for status, _ in responses] == [b"HTTP/1.1 200 OK"] * 4
    assert b'"model_name":"mobilenet_digits"' in responses[0][1] and responses[1][1] == b""
    assert b'"model_name":"mobilenet_digits"' in responses[2][1] and b'"name":"edge-agent"' in responses[3][1]
    with socket.create_connection(("127.0.0.1", service.http.port), timeout=5) as sock:    # curl's large bodies
        sock.sendall(infer.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n", 1)[:-len(body)])
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")


def test_replies_to_a_client_that_does_not_read_stay_whole_and_in_order(service, digits):
    """Workers write replies on the socket themselves; when it is full, the rest goes through the
    loop's transport. A client that pipelines many requests and reads nothing until the end fills
    both buffers: every reply must still arrive once, whole, in order."""
    frames, labels = digits
    rows = 4                                     # JSON outputs: about 1 KB a reply
    header = json.dumps({"inputs": [{"name": "frames", "shape": [rows, 64, 64, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": rows * 64 * 64 * 3}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
                         "parameters": {"slo_ms": 60_000}}).encode()
    count = 200
    requests = []
    for k in range(count):
        json_part = json.dumps({**json.loads(header), "id": str(k)}).encode()
        body = json_part + frames[k % 50:k % 50 + rows].tobytes()
        requests.append((f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                         f"Inference-Header-Content-Length: {len(json_part)}\r\n\r\n").encode() + body)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connect: a small window
        sock.settimeout(30)
        sock.connect(("127.0.0.1", service.http.port))
        time.sleep(0.05)
        for connection in list(service.http._connections):           # the server's side, just as small
            server_side = connection.transport.get_extra_info("socket")
            if server_side.getpeername() == sock.getsockname():
                server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = b"".join(requests) + b"GET /v2 HTTP/1.1\r\nConnection: close\r\n\r\n"
        with ThreadPoolExecutor(1) as pool:      # a full server stops reading: send beside the reads
            sending = pool.submit(sock.sendall, data)
            time.sleep(0.5)                      # the server answers into full buffers meanwhile
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            sending.result()
    responses = split_responses(b"".join(chunks))
    assert len(responses) == count + 1
    for k, (status, body) in enumerate(responses[:count]):
        assert status == b"HTTP/1.1 200 OK"
        reply = json.loads(body)
        assert reply["id"] == str(k)
        logits = np.array(reply["outputs"][0]["data"]).reshape(rows, 10)
        assert (logits.argmax(1) == labels[k % 50:k % 50 + rows]).mean() >= 0.9
    assert b'"name":"edge-agent"' in responses[-1][1]


def test_a_client_that_leaves_mid_request_harms_nobody(service, client, digits):
    frames, _ = digits
    header = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                     "data": frames[0].ravel().tolist()}]}).encode()
    for cut in (None, 20):                       # after the whole request, and mid-body
        with socket.create_connection(("127.0.0.1", service.http.port)) as sock:
            sent = header if cut is None else header[:cut]
            sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: {len(header)}\r\n\r\n".encode()
                         + sent)
    time.sleep(0.05)
    assert client.is_server_ready()
    assert client.infer(MODEL, [frame_input(frames[:1])]).as_numpy("logits").shape == (1, 10)


def test_concurrent_requests_over_several_connections_all_get_answers(service, digits):
    frames, labels = digits
    port = service.http.port

    def worker(thread_index):
        answers = []
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as own_client:
            for i in range(thread_index, 200, 8):
                result = own_client.infer(MODEL, [frame_input(frames[i:i + 1])], request_id=str(i),
                                          parameters={"slo_ms": 10_000})
                answers.append((i, int(result.get_response()["id"]), int(np.argmax(result.as_numpy("logits")))))
        return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [a for chunk in pool.map(worker, range(8)) for a in chunk]
    assert sorted(i for i, _, _ in answers) == list(range(200))
    assert all(i == echoed for i, echoed, _ in answers)
    assert sum(predicted == labels[i] for i, _, predicted in answers) >= 180


def test_async_infer_with_client_concurrency(service, digits):
    frames, labels = digits
    with triton.InferenceServerClient(f"127.0.0.1:{service.http.port}", concurrency=4) as pooled:
        pending = [pooled.async_infer(MODEL, [frame_input(frames[i:i + 1])]) for i in range(20)]
        predicted = [int(np.argmax(p.get_result(timeout=10).as_numpy("logits"))) for p in pending]
    assert sum(p == label for p, label in zip(predicted, labels[:20])) >= 18


# --- life cycle ---------------------------------------------------------------------------------

def test_stop_taking_answers_503_while_alive_then_stops():
    svc = Service(make_config())
    try:
        intake: HttpIntake = svc.http
        frames = frames_from_digits(load_test_set()[0][:1])
        with triton.InferenceServerClient(f"127.0.0.1:{intake.port}") as c:
            assert c.infer(MODEL, [frame_input(frames)]).as_numpy("logits").shape == (1, 10)
            intake.stop_taking()
            assert c.is_server_live() and not c.is_server_ready() and not c.is_model_ready(MODEL)
            error = server_error(lambda: c.infer(MODEL, [frame_input(frames)]))
            assert error.status() == "503" and error.message().startswith("shutting_down: ")
    finally:
        svc.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", intake.port), timeout=1).close()


def test_a_request_queued_at_shutdown_still_gets_its_one_reply(digits):
    # A fixed batch of 4 never forms from one request: it is still queued when the service closes.
    config = parse_config({"config_version": CONFIG_VERSION, "agent": {"device": "http-board", "workers": 1},
                           "mqtt": {"enabled": False}, "http": {"enabled": True, "port": 0},
                           "models": [{"name": MODEL, "card": "demo:mobilenet_digits",
                                       "batching": {"rule": "fixed", "size": 4}}]})
    svc = Service(config, grace_s=0.1)
    frames, _ = digits
    header = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 64 * 64 * 3}}],
                         "parameters": {"slo_ms": 60_000}}).encode()
    body = header + frames[0].tobytes()
    with socket.create_connection(("127.0.0.1", svc.http.port), timeout=5) as sock:
        sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                     f"Inference-Header-Content-Length: {len(header)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while not svc.agent.scheduler.queued() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert svc.agent.scheduler.queued() == 1
        svc.close()
        chunks = []
        while chunk := sock.recv(65536):       # the reply, then the server closes the connection
            chunks.append(chunk)
    [(status, reply)] = split_responses(b"".join(chunks))
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert json.loads(reply)["error"] == "shutting_down: the agent shut down before this request ran"


def _start_cli(tmp_path) -> subprocess.Popen:
    """`edge-agent run` serving mobilenet over HTTP only, on a free port, in a process of its own."""
    config_file = tmp_path / "agent.toml"
    config_file.write_text('config_version = 1\n[agent]\ndevice = "cli-board"\nworkers = 1\n'
                           '[[models]]\nname = "mobilenet_digits"\ncard = "demo:mobilenet_digits"\n')
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config_file), "--no-mqtt",
                             "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_serves_http_only(tmp_path, digits):
    frames, labels = digits
    proc = _start_cli(tmp_path)
    try:
        line = proc.stdout.readline()
        assert "serving ['mobilenet_digits'] on http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
            assert c.is_server_ready()
            logits = c.infer(MODEL, [frame_input(frames[5:6])]).as_numpy("logits")
            assert int(np.argmax(logits)) == labels[5]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "stopping" in out


def test_the_start_up_heap_is_frozen_out_of_the_collectors_reach(service):
    """The service freezes what it built at start (models, runtimes, tables), so a full collection
    under load walks only the objects made since, instead of stopping every thread for all of them."""
    import gc
    loaded = service.agent.models["mobilenet_digits"]
    assert gc.get_freeze_count() > 10_000
    assert gc.is_tracked(loaded)
    assert all(obj is not loaded for obj in gc.get_objects(generation=2))   # frozen, not in the oldest generation


def test_cli_stops_once_under_a_burst_of_signals(tmp_path):
    """A signal handler only records the signal: a burst of SIGTERM and SIGINT, some landing while
    the agent shuts down, still ends it promptly, cleanly and once (a handler that set an Event
    could deadlock on the Event's lock when a second signal re-entered it)."""
    proc = _start_cli(tmp_path)
    try:
        line = proc.stdout.readline()
        assert "serving ['mobilenet_digits']" in line, line
        for k in range(200):
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGTERM if k % 2 else signal.SIGINT)
            time.sleep(0.001)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert out.count("stopping") == 1 and "Traceback" not in out, out
