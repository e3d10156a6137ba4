"""The demo, run briefly: a real broker, both models, the cameras; every frame answered."""
import io

import pytest

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


@pytest.mark.parametrize("group", [False, True], ids=["burst", "process-group"])
def test_sigterm_stops_the_demo_like_ctrl_c_and_stops_its_broker(broker, group):   # broker: skips if mosquitto is absent
    """`kill` or `timeout` must not leave the demo's own Mosquitto running, and a burst of signals
    (an impatient Ctrl-C) must not break the shutdown half-way. ``process-group``: one SIGTERM to
    the whole group, as `timeout` or a service manager sends it, reaches the camera process too;
    the demo stops as asked, no traceback."""
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
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
        start_new_session=group)
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
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            for signum in (signal.SIGTERM, signal.SIGINT) * 20:
                process.send_signal(signum)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, "".join(lines) + rest
    assert "stopping: cameras first" in rest and "Traceback" not in rest, rest
    assert "unanswered: " in rest or (group and "stopped by a signal" in rest), rest
    with socket.socket() as probe:                   # the demo's broker is gone with it
        probe.settimeout(1.0)
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"a broker still listens on port {port}"


def test_cameras_are_sized_from_the_measured_capacity():
    """The demo's rates follow what the board measured: a board twice as slow gets half the frames,
    and `--load 1` asks the stated share of the slots' time, whatever the board."""
    from edge_lab.demo import LOAD_SHARE, size_cameras

    fast = {"mobilenet_digits": 0.0005, "resnet_digits": 0.0025}     # seconds per frame at batch 1
    slow = {name: 2 * t for name, t in fast.items()}
    on_fast, on_slow = size_cameras(fast, slots=2), size_cameras(slow, slots=2)
    assert on_slow.capacity_fps == pytest.approx(on_fast.capacity_fps / 2)
    for a, b in zip(on_fast.cameras, on_slow.cameras):
        assert b.fps == pytest.approx(a.fps / 2), (a, b)
    for sizing in (on_fast, on_slow, size_cameras(fast, slots=4, load=1.5)):
        busy = sum(c.fps * (fast if sizing is not on_slow else slow)[c.model] for c in sizing.cameras)
        assert busy == pytest.approx(LOAD_SHARE * sizing.load * sizing.slots)   # core-seconds per second
    # The groups keep their shares of the traffic.
    total = sum(c.fps for c in on_fast.cameras)
    assert [c.fps / total for c in on_fast.cameras] == pytest.approx(
        [c.fps / sum(d.fps for d in DEFAULT_CAMERAS) for c in DEFAULT_CAMERAS])
    text = on_fast.describe()
    assert f"{on_fast.capacity_fps:.0f} frames/s" in text and f"{100 * LOAD_SHARE:.0f}% of it" in text


def test_a_slow_board_gets_slos_it_can_meet():
    from edge_lab.demo import MIN_SLO_OVER_B1, size_cameras

    very_slow = {"mobilenet_digits": 0.004, "resnet_digits": 0.015}   # 4 ms and 15 ms at batch 1
    sized = {c.name: c for c in size_cameras(very_slow, slots=4).cameras}
    # Its own batch-1 time several times over, plus a resnet batch it may find running.
    assert sized["lobby"].slo_ms == pytest.approx(MIN_SLO_OVER_B1 * 4 + 15)      # was 10 ms
    assert sized["gate"].slo_ms == pytest.approx(MIN_SLO_OVER_B1 * 15 + 15)      # was 30 ms
    assert sized["yard"].slo_ms == 100                                           # already loose enough
    fast = {c.name: c for c in size_cameras({"mobilenet_digits": 0.0005, "resnet_digits": 0.0025}, slots=2).cameras}
    assert [fast[c.name].slo_ms for c in DEFAULT_CAMERAS] == [c.slo_ms for c in DEFAULT_CAMERAS]   # unchanged
