"""`python -m serving.server` (what `make serve` runs) as a subprocess on free ports: the scenarios that
must see what the launcher does about a crash or a dead stub run the server this way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from serving import processes
from serving.server import TritonEndpoints, free_ports

from .probes import server_ready

REPO_ROOT = Path(__file__).resolve().parents[2]


class LauncherError(RuntimeError):
    pass


class Launcher(TritonEndpoints):
    def __init__(self, repository: Path, log_path: Path):
        self.repository = repository
        self.log_path = log_path
        self.address = "127.0.0.1"
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.process: Optional[subprocess.Popen] = None

    def start(self, ready_timeout: float = 600.0) -> "Launcher":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--repository", str(self.repository),
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
             "--metrics-port", str(self.metrics_port)],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the server answers ready (and its stubs are all up)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise LauncherError(f"serving.server exited with code {self.process.returncode}; see {self.log_path}")
            if server_ready(self.http_url) and self.server_pid() is not None:
                return time.monotonic() - started
            time.sleep(0.2)
        raise LauncherError(f"not ready after {timeout:.0f} s; see {self.log_path}")

    def server_pid(self) -> Optional[int]:
        """The tritonserver the launcher runs now (a restart makes a new one)."""
        found = [pid for pid in processes.children(self.process.pid) if processes.state(pid) not in (None, "Z")]
        return found[0] if found else None

    def log_lines(self, text: str) -> List[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if text in line]

    def stop(self, timeout: float = 180.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> "Launcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
