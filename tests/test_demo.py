"""The demo, run briefly: a real broker, both models, the cameras; every frame answered."""
import io

from edge_lab.demo import DEFAULT_CAMERAS, run_demo


def test_demo_serves_every_camera_and_answers_every_frame(broker):   # broker: skips if mosquitto is absent
    out = io.StringIO()
    summary = run_demo(duration_s=4.0, load=0.3, interval_s=1.0, out=out)
    assert set(summary) == {c.name for c in DEFAULT_CAMERAS}
    for name, s in summary.items():
        assert s["sent"] > 0, name
        assert s["unanswered"] == 0, (name, s)
        assert s["ok"] + sum(s["errors"].values()) == s["sent"], (name, s)
        assert s["ok"] >= 0.5 * s["sent"], (name, s)          # light load: most frames make their SLO
        assert s["correct"] >= 0.9 * s["ok"], (name, s)       # real predictions on real digits
    text = out.getvalue()
    assert "p99 ms" in text and "mobilenet_digits" in text and "resnet_digits" in text


def test_sigterm_stops_the_demo_like_ctrl_c_and_stops_its_broker(broker):   # broker: skips if mosquitto is absent
    """`kill` or `timeout` must not leave the demo's own Mosquitto running, and a burst of signals
    (a process-group kill, an impatient Ctrl-C) must not break the shutdown half-way."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))",
         "demo", "--duration", "120", "--load", "0.2"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines = []
    port = None
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:                  # up to the first table: cameras and agent both running
            lines.append(line)
            found = re.search(r"broker: mosquitto on ([\d.]+):(\d+)", line)
            if found:
                port = int(found.group(2))
            if line.startswith("edge-agent demo:") or time.monotonic() > deadline:
                break
        assert port is not None and any(l.startswith("edge-agent demo:") for l in lines), "".join(lines)
        for signum in (signal.SIGTERM, signal.SIGINT) * 20:
            process.send_signal(signum)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, "".join(lines) + rest
    assert "stopping: cameras first" in rest and "unanswered: " in rest, rest
    with socket.socket() as probe:                   # the demo's broker is gone with it
        probe.settimeout(1.0)
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"a broker still listens on port {port}"
