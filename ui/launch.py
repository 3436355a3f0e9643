"""The page as a child process (`python -m ui`) on a free loopback port, for the tests and screenshots."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

from serving.server import free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0


class PageProcess:
    """`python -m ui` in front of the Triton server at `grpc_url` / `http_url`; `.url` once started."""

    def __init__(self, grpc_url: str, http_url: str, log_file: Path, extra_args: Sequence[str] = ()):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_file = log_file
        self.command: List[str] = [sys.executable, "-m", "ui", "--port", str(self.port), "--grpc-url", grpc_url,
                                   "--http-url", http_url, *extra_args]
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "PageProcess":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "api/info", timeout=5) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the page exited with code {self.process.returncode}; see {self.log_file}")
            try:
                self.info()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise RuntimeError(f"the page did not answer within {READY_TIMEOUT_S:.0f} s; see {self.log_file}")

    def __enter__(self) -> "PageProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
