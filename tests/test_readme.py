"""The README's examples run as written: every fenced block marked ``runnable`` (```` ```sh runnable ```` or
```` ```python runnable ````), in the order the README shows them, in one shell - as a newcomer pastes them
after "Try it by hand" - against a real Redis and the mock upstream the first block starts.

Python blocks run as ``python - <<EOF`` in that shell, so what a block exports (``STREAMFOLD_UPSTREAMS``) and
starts in the background (the mock upstream on port 8400, a call runner, a stream worker, the gateway on 8410)
serves the blocks after it. Everything the shell started is stopped at the end. Only the namespace, the rq
queue and the Redis database (the tests' own) differ from a newcomer's shell.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.redis

BLOCK = re.compile(r"^```(sh|python) runnable\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
END = "STREAMFOLD_README_BLOCK_END"


def runnable_blocks(readme: str) -> list[tuple[int, str, str]]:
    """(line number, language, text) of every runnable block, in README order."""
    return [(readme.count("\n", 0, match.start()) + 1, match.group(1), match.group(2))
            for match in BLOCK.finditer(readme)]


def as_one_shell_script(blocks: list[tuple[int, str, str]]) -> str:
    lines = ["set -euo pipefail"]
    for line, language, text in blocks:
        lines.append(f"echo '=== README line {line}'")
        lines.append(text if language == "sh" else f"python - <<'{END}'\n{text}{END}")
    lines.append("echo '=== README done'")
    return "\n".join(lines) + "\n"


def test_the_readme_marks_its_examples_runnable_and_the_first_one_starts_the_pipeline() -> None:
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert len([b for b in blocks if b[1] == "python"]) >= 6 and len([b for b in blocks if b[1] == "sh"]) >= 3
    assert "mock-upstream" in blocks[0][2] and "producer work" in blocks[0][2] and "worker run" in blocks[0][2]


def test_every_runnable_readme_block_runs_as_written_in_one_shell(real_redis_url: str, namespace: str,
                                                                  tmp_path: Path) -> None:
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    script = tmp_path / "readme.sh"
    script.write_text(as_one_shell_script(blocks))
    log_path = tmp_path / "readme.log"
    env = {**os.environ, "STREAMFOLD_REDIS_URL": real_redis_url, "STREAMFOLD_NAMESPACE": namespace,
           "STREAMFOLD_QUEUE": namespace, "PYTHONUNBUFFERED": "1"}
    env.pop("STREAMFOLD_UPSTREAMS", None)  # what the README's own lines set up, nothing from outside
    with log_path.open("wb") as log:
        # Output goes to a file, not a pipe: the background processes keep their copies of it open.
        shell = subprocess.Popen(["bash", str(script)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            status = shell.wait(timeout=150)
        finally:
            _stop_group(shell.pid)
    output = log_path.read_text(errors="replace")
    assert status == 0, f"a README block failed (the last '=== README line' names it):\n{output[-6000:]}"
    assert "=== README done" in output
    assert "Traceback" not in output, output[-6000:]
    for line, _, _ in blocks:
        assert f"=== README line {line}" in output
    assert output.count('"status":"completed"') + output.count("completed ") >= 6, output[-6000:]
    # The recovery recipe shows one: the killed worker dead holding requests, a peer's recovery, then nothing held.
    held = [int(count) for count in re.findall(r"^doomed\s+dead\s+(\d+)", output, re.MULTILINE)]
    assert len(held) == 2 and held[0] > 0 and held[1] == 0, held
    assert "request_recovered" in output and "worker=survivor" in output


def _stop_group(pgid: int) -> None:
    """SIGTERM everything the shell started (workers drain), then SIGKILL what is left after a few seconds."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
