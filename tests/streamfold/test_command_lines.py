"""Both command lines on the mistakes people make: one line on stderr and an exit status that tells the kind
of mistake (streamfold.cli), a bad flag answered with the command's own usage, and settings a component does
not use never stopping it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import redis

from producer import Publisher, enqueue_chat_completion
from streamfold import cli
from streamfold.settings import Settings
from tests.conftest import ROOT, TEST_REDIS_URL

pytestmark = pytest.mark.redis

# Commands that talk to Redis at once, each with what it needs to get that far.
COMMANDS = [("worker", "run"), ("worker", "stats", "--interval", "0"), ("producer", "result", "r1"),
            ("producer", "enqueue", "--model", "m", "--message", "hi"), ("producer", "cancel", "r1"),
            ("producer", "runners"), ("producer", "work"), ("producer", "serve", "--port", "0")]


def run(*command: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def environment(**settings: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
    env.update({f"STREAMFOLD_{name.upper()}": value for name, value in settings.items()})
    env.setdefault("STREAMFOLD_SOCKET_TIMEOUT", "2")
    env.setdefault("STREAMFOLD_BLOCK_MS", "100")
    # Call runners and the gateway refuse to start without an upstream table; none is called here.
    env.setdefault("STREAMFOLD_UPSTREAMS", '{"default": {"base_url": "http://127.0.0.1:9/v1"}}')
    return env


def one_line(result: subprocess.CompletedProcess[str], prog: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"python -m {prog}: error: ") and "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def not_redis() -> Iterator[int]:
    """A port that answers like a web server, not like Redis."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.recv(1024)
                connection.sendall(b"<html>not redis</html>\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_database_redis_does_not_have_is_one_line_and_exit_5(command: tuple[str, ...]) -> None:
    result = run(*command, env=environment(redis_url=TEST_REDIS_URL.rsplit("/", 1)[0] + "/99"))
    assert result.returncode == cli.REDIS_REFUSED, result.stderr
    assert "DB index is out of range" in one_line(result, command[0])


@pytest.mark.parametrize("command", [COMMANDS[0], COMMANDS[1], COMMANDS[2], COMMANDS[6]], ids=" ".join)
def test_a_server_that_is_not_redis_and_a_wrong_password_are_refusals(command: tuple[str, ...],
                                                                      not_redis: int) -> None:
    for url in (f"redis://127.0.0.1:{not_redis}/0", TEST_REDIS_URL.replace("redis://", "redis://nobody:wrong@")):
        result = run(*command, env=environment(redis_url=url))
        assert result.returncode == cli.REDIS_REFUSED, result.stderr
        assert "wrong" not in one_line(result, command[0])  # the password is never shown


@pytest.mark.parametrize("command", [COMMANDS[1], COMMANDS[2], COMMANDS[3], COMMANDS[4]], ids=" ".join)
def test_a_redis_that_cannot_be_reached_is_one_line_and_exit_4(command: tuple[str, ...]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    result = run(*command, env=environment(redis_url=f"redis://127.0.0.1:{closed}/0"))
    assert result.returncode == cli.REDIS_UNAVAILABLE, result.stderr
    assert "Redis unavailable" in one_line(result, command[0])


def test_debug_shows_the_traceback_too() -> None:
    result = run("worker", "stats", "--debug", env=environment(redis_url=TEST_REDIS_URL.rsplit("/", 1)[0] + "/99"))
    assert result.returncode == cli.REDIS_REFUSED
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("python -m worker: error:")


@pytest.mark.parametrize("command", [("worker", "run"), ("worker", "stats"), ("producer", "result", "r1"),
                                     ("producer", "work")], ids=" ".join)
def test_a_bad_flag_gets_the_usage_of_its_command(command: tuple[str, ...]) -> None:
    result = run(*command, "--bogus", env=environment())
    assert result.returncode == cli.USAGE
    assert result.stderr.startswith(f"usage: python -m {' '.join(command[:2])} ")
    assert "unrecognized arguments: --bogus" in result.stderr


def test_a_call_runner_without_an_upstream_table_refuses_to_start_rather_than_fail_every_call(
        namespace: str) -> None:
    env = environment(redis_url=TEST_REDIS_URL, namespace=namespace)
    del env["STREAMFOLD_UPSTREAMS"]
    result = run("producer", "work", "--burst", env=env)
    assert result.returncode == cli.USAGE
    assert "STREAMFOLD_UPSTREAMS is not set" in one_line(result, "producer")


def test_an_upstream_table_that_cannot_be_read_stops_only_what_calls_upstreams(namespace: str,
                                                                              real_redis: redis.Redis) -> None:
    env = environment(redis_url=TEST_REDIS_URL, namespace=namespace, upstreams='{"default": {"base_url": 5}',
                      prices="[", gateway_keys="{")
    for command in (("worker", "stats", "--interval", "0"), ("worker", "health"), ("producer", "result", "r1"),
                    ("producer", "runners")):
        result = run(*command, env=env)
        assert "STREAMFOLD_UPSTREAMS" not in result.stderr and "STREAMFOLD_GATEWAY_KEYS" not in result.stderr, command
    for command in (("producer", "work", "--burst"), ("producer", "serve", "--port", "0"),
                    ("producer", "enqueue", "--model", "m", "--message", "hi")):
        result = run(*command, env=env)
        assert result.returncode == cli.USAGE
        assert "STREAMFOLD_UPSTREAMS is not valid JSON" in one_line(result, "producer")
    # The worker reads prices: a table of prices it cannot read stops it, and says which.
    result = run("worker", "run", "--burst", env=env)
    assert result.returncode == cli.USAGE and "STREAMFOLD_PRICES" in one_line(result, "worker")
    del env["STREAMFOLD_PRICES"]
    assert run("worker", "run", "--burst", env=env).returncode == cli.OK


def test_result_and_enqueue_wait_tell_failed_from_completed(namespace: str, real_redis: redis.Redis) -> None:
    env = environment(redis_url=TEST_REDIS_URL, namespace=namespace)
    settings = Settings(redis_url=TEST_REDIS_URL, namespace=namespace)
    publisher = Publisher(real_redis, settings.keys, batch_size=1)
    for request_id, end in (("good", publisher.end), ("bad", lambda rid: publisher.fail(rid, {"type": "boom"}))):
        publisher.start(request_id)
        publisher.push(request_id, {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
        end(request_id)
    assert run("worker", "run", "--burst", env=env).returncode == 0
    good, bad = run("producer", "result", "good", env=env), run("producer", "result", "bad", env=env)
    assert (good.returncode, json.loads(good.stdout)["status"]) == (cli.OK, "completed")
    assert (bad.returncode, json.loads(bad.stdout)["status"]) == (cli.NO, "failed")


def test_cancel_fails_a_waiting_call_once_and_says_when_there_is_nothing_to_cancel(namespace: str,
                                                                        real_redis: redis.Redis) -> None:
    env = environment(redis_url=TEST_REDIS_URL, namespace=namespace, queue=namespace,
                      upstreams='{"default": {"base_url": "http://127.0.0.1:9/v1"}}')
    settings = Settings(redis_url=TEST_REDIS_URL, namespace=namespace, queue=namespace,
                        upstreams={"default": {"base_url": "http://127.0.0.1:9/v1"}})
    request_id = enqueue_chat_completion({"model": "m", "messages": []}, client=real_redis, settings=settings)
    first = run("producer", "cancel", request_id, env=env)
    assert (first.returncode, first.stdout.strip()) == (cli.OK, f"cancelled: {request_id}")
    assert run("worker", "run", "--burst", env=env).returncode == 0
    record = run("producer", "result", request_id, env=env)
    assert record.returncode == cli.NO and json.loads(record.stdout)["error"]["type"] == "cancelled"
    assert run("producer", "cancel", request_id, env=env).returncode == cli.OK  # cancelled already: still so
    unknown = run("producer", "cancel", "no-such-call", env=env)
    assert unknown.returncode == cli.NO and "nothing to cancel" in one_line(unknown, "producer")
    for name in real_redis.scan_iter(match=f"rq:*{namespace}*"):
        real_redis.delete(name)
