"""``edge-agent run`` as a second process for the tests that need a real peer or pool member: its
config written from TOML text, its output kept in ``<device>.log`` beside it."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    """One agent process on ``config`` (TOML text), started at once."""

    def __init__(self, tmp_path: Path, device: str, config: str) -> None:
        self.device = device
        self.config = tmp_path / f"{device}.toml"
        self.config.write_text(config)
        self.log_path = tmp_path / f"{device}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def ready(self) -> bool:
        """Whether every intake listens (the agent prints ``serving`` then); fails, with its log's
        tail, if the process ended."""
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        return b"serving" in self.log_path.read_bytes()

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def close(self) -> None:
        """Stop it (a stopped one is continued first, so it can take SIGTERM), killed if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()
