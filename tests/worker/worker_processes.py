"""Real ``python -m worker run`` processes for tests that kill, stop or starve them (``spawn`` starts one), and a
TCP proxy to Redis that cuts or freezes their connections."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
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


class CuttableProxy:
    """A TCP proxy to Redis that the test can cut (every connection dropped, new ones refused) and restore,
    or freeze (connections stay open and accepted, but nothing goes through) and thaw."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.flowing = threading.Event()
        self.flowing.set()
        self.refused = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.up.clear()
        with self._lock:
            for sock in self._open:
                _close(sock)
            self._open.clear()

    def restore(self) -> None:
        self.up.set()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.cut()
        _close(self.server)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                self.refused += 1
                _close(client)
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
