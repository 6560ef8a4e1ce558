"""Real ``python -m worker run`` processes for tests that kill, stop or starve them: ``spawn`` starts one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from pipeline_rig import ROOT


class WorkerProcess:
    """``python -m worker run`` in a child process, its log kept in a file for the failure report."""

    def __init__(self, log_dir: Path, name: str, redis_url: str, namespace: str, *args: str, **settings: Any) -> None:
        env = {**os.environ, "STREAMFOLD_REDIS_URL": redis_url, "STREAMFOLD_NAMESPACE": namespace,
               "STREAMFOLD_BLOCK_MS": "100", "STREAMFOLD_SOCKET_TIMEOUT": "2",
               **{f"STREAMFOLD_{key.upper()}": str(value) for key, value in settings.items()}}
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "worker", "run", "--name", name, *args], env=env,
                                        cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def spawn(tmp_path: Path, real_redis_url: str, namespace: str) -> Iterator[Any]:
    workers: list[WorkerProcess] = []

    def start(name: str, *args: str, redis_url: str = real_redis_url, **settings: Any) -> WorkerProcess:
        workers.append(WorkerProcess(tmp_path, name, redis_url, namespace, *args, **settings))
        return workers[-1]

    yield start
    for worker in workers:
        worker.stop()
