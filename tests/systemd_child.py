"""``edge-agent run`` for tests/test_systemd.py, with two test-only levers (nothing in the agent
reads them): STATUS= lines every half second instead of every few seconds, and a real scheduler
stall on demand: the line ``stall`` on stdin makes a thread take the live loop's lock and never
release it, as a wedged dispatch would. Every other thread (the run loop, the intakes) goes on.

    python tests/systemd_child.py run --config FILE [--http-port 0 --no-mqtt]
"""
import sys
import threading

import agent.ops.supervisor as supervisor
import agent.runtime.live as live
from agent.cli import main

supervisor.STATUS_INTERVAL_S = 0.5
loops: list = []
_start = live.LiveLoop.start


def _recording_start(self) -> None:
    loops.append(self)
    _start(self)


def _stall_on_request() -> None:
    for line in sys.stdin:
        if line.strip() == "stall":
            threading.Thread(target=loops[0].lock.acquire, name="test-stall", daemon=True).start()
            print("systemd_child: scheduler lock taken", file=sys.stderr, flush=True)


live.LiveLoop.start = _recording_start
threading.Thread(target=_stall_on_request, name="test-stall-reader", daemon=True).start()
sys.exit(main(sys.argv[1:]))
