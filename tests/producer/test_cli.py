"""``python -m producer``: each command against a real Redis, its help, and errors as one line, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from producer.cli import main
from streamfold import contract
from streamfold.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT / "fixtures" / "recorded" / "openai_refusal.jsonl"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace, shards=2)


@pytest.fixture
def env(real_redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """STREAMFOLD_* pointing at the test Redis and namespace, for main() and for subprocesses alike."""
    settings = {"STREAMFOLD_REDIS_URL": real_redis_url, "STREAMFOLD_NAMESPACE": namespace,
                "STREAMFOLD_SHARDS": "2", "STREAMFOLD_BLOCK_MS": "100"}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **settings}


@pytest.fixture
def client(real_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(real_redis_url)
    yield client
    client.close()


def publish_result(client: redis.Redis, keys: Keys, request_id: str) -> dict[str, Any]:
    record = {"request_id": request_id, "status": "completed", "completion": {}, "error": None,
              "warnings": [], "metrics": {}, "meta": {}}
    encoded = contract.encode_record(record)
    client.set(keys.result(request_id), encoded)
    client.xadd(keys.results(keys.shard(request_id)), {contract.RID: request_id.encode(), contract.DATA: encoded})
    client.publish(keys.notify(request_id), b"completed")
    return record


def publish_usage(client: redis.Redis, keys: Keys, request_id: str) -> None:
    client.xadd(keys.usage(keys.shard(request_id)), {
        contract.RID: request_id.encode(), contract.DATA: contract.encode_record({"request_id": request_id})})


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines()]


def run_cli(*args: str, env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, timeout=30)


# --- result -----------------------------------------------------------------------------------------------

@pytest.mark.redis
def test_result_prints_the_record_as_one_json_line(env: dict[str, str], client: redis.Redis, keys: Keys,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    record = publish_result(client, keys, "req-1")
    assert main(["result", "req-1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json_lines(out) == [record]


@pytest.mark.redis
def test_result_of_an_unknown_request_exits_1_with_a_message(env: dict[str, str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["result", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no result for nope" in captured.err and captured.err.count("\n") == 1


@pytest.mark.redis
def test_result_wait_returns_once_the_result_is_published(env: dict[str, str], real_redis_url: str, keys: Keys,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def publish() -> None:
        time.sleep(0.3)
        with redis.Redis.from_url(real_redis_url) as worker_client:
            publish_result(worker_client, keys, "req-1")
    thread = threading.Thread(target=publish)
    thread.start()
    assert main(["result", "req-1", "--wait", "10"]) == 0
    thread.join()
    assert json_lines(capsys.readouterr().out)[0]["request_id"] == "req-1"


@pytest.mark.redis
def test_result_wait_timeout_exits_1_with_a_message(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["result", "req-1", "--wait", "0.2"]) == 1
    assert "no result for req-1 within 0.2 s" in capsys.readouterr().err


# --- results / usage --------------------------------------------------------------------------------------

@pytest.mark.redis
def test_results_from_start_prints_every_stored_result(env: dict[str, str], client: redis.Redis, keys: Keys,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for n in range(5):
        publish_result(client, keys, f"req-{n}")
    assert main(["results", "--from-start"]) == 0
    assert sorted(r["request_id"] for r in json_lines(capsys.readouterr().out)) == [f"req-{n}" for n in range(5)]
    assert main(["results"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.redis
def test_usage_prints_each_event_once_per_group(env: dict[str, str], client: redis.Redis, keys: Keys,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for n in range(4):
        publish_usage(client, keys, f"req-{n}")
    assert main(["usage", "--from-start"]) == 0
    assert len(json_lines(capsys.readouterr().out)) == 4
    assert main(["usage", "--from-start"]) == 0  # same group: everything was acknowledged
    assert capsys.readouterr().out == ""
    assert main(["usage", "--from-start", "--group", "billing"]) == 0
    assert len(json_lines(capsys.readouterr().out)) == 4


def test_usage_from_start_on_a_group_made_earlier_says_it_keeps_its_place(
        env: dict[str, str], client: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    publish_usage(client, keys, "before")
    assert main(["usage"]) == 0  # a first look makes the group at the newest event: "before" is behind it
    assert capsys.readouterr().out == ""
    publish_usage(client, keys, "after")
    assert main(["usage", "--from-start"]) == 0
    out, err = capsys.readouterr()
    assert [event["request_id"] for event in json_lines(out)] == ["after"]
    assert "group 'analytics' exists already and keeps its place" in err
    assert f"XGROUP DESTROY {keys.usage(0)} analytics" in err
    assert main(["usage", "--from-start", "--group", "fresh"]) == 0
    out, err = capsys.readouterr()
    assert [event["request_id"] for event in json_lines(out)] == ["before", "after"]
    assert "warning" not in err


@pytest.mark.redis
def test_results_follow_prints_new_results_and_ctrl_c_exits_0_quietly(env: dict[str, str], real_redis_url: str,
                                                                      keys: Keys) -> None:
    # Ctrl-C as at a terminal: a suite started in the background of a non-interactive shell has SIGINT
    # ignored, and an ignored signal stays ignored in every process it starts.
    follower = subprocess.Popen([sys.executable, "-m", "producer", "results", "--follow"], cwd=ROOT,
                                env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stop = threading.Event()

    def keep_publishing() -> None:
        # The follower starts at the newest result, so publish until it has printed one.
        with redis.Redis.from_url(real_redis_url) as worker_client:
            while not stop.is_set():
                publish_result(worker_client, keys, "req-live")
                stop.wait(0.2)

    publisher = threading.Thread(target=keep_publishing)
    publisher.start()
    try:
        assert follower.stdout is not None
        line = follower.stdout.readline()
        stop.set()
        assert orjson.loads(line)["request_id"] == "req-live"
        follower.send_signal(signal.SIGINT)
        try:
            _, err = follower.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            follower.send_signal(signal.SIGABRT)  # its stack, to say where it waits
            raise AssertionError(f"Ctrl-C did not end it:\n{follower.communicate()[1].decode()}") from None
    finally:
        stop.set()
        publisher.join()
        follower.kill()
        follower.communicate()
    assert follower.returncode == 0 and err == b""


# --- replay -----------------------------------------------------------------------------------------------

@pytest.mark.redis
def test_replay_prints_one_request_id_per_line_in_input_order(env: dict[str, str], client: redis.Redis, keys: Keys,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(CAPTURE), "--copies", "3", "--mode", "incremental"]) == 0
    request_ids = capsys.readouterr().out.split()
    assert len(set(request_ids)) == 3
    payloads = [line for line in CAPTURE.read_bytes().splitlines() if line]
    for request_id in request_ids:
        entries = [contract.decode_envelope(f) for _, f in client.xrange(keys.chunks(request_id))]
        assert [e.payload for e in entries if e.kind == "chunk"] == payloads
        assert entries[-1].kind == "end"


@pytest.mark.redis
def test_replay_reads_a_capture_from_stdin(env: dict[str, str], client: redis.Redis, keys: Keys) -> None:
    sse = b": hello\n\ndata: {\"id\":\"a\",\"choices\":[]}\n\ndata: [DONE]\n\n"
    done = run_cli("replay", "-", env=env, stdin=sse)
    assert done.returncode == 0, done.stderr
    [request_id] = done.stdout.decode().split()
    entries = [contract.decode_envelope(f) for _, f in client.xrange(keys.chunks(request_id))]
    assert [(e.kind, e.payload) for e in entries[1:]] == [("chunk", b'{"id":"a","choices":[]}'), ("end", b"")]


# --- errors and help --------------------------------------------------------------------------------------

def test_an_unreachable_redis_is_one_line_on_stderr_and_exit_4(tmp_path: Path) -> None:
    env = {**os.environ, "STREAMFOLD_REDIS_URL": "redis://127.0.0.1:1/0", "STREAMFOLD_SOCKET_TIMEOUT": "1"}
    done = run_cli("replay", str(CAPTURE), env=env)
    err = done.stderr.decode()
    assert done.returncode == 4
    assert err.count("\n") == 1 and "Redis unavailable" in err and "Traceback" not in err


@pytest.mark.parametrize(("setting", "value"), [("STREAMFOLD_SHARDS", "0"), ("STREAMFOLD_BLOCK_MS", "60000")])
def test_settings_that_cannot_work_are_one_line_on_stderr_and_exit_2(
        setting: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(setting, value)
    assert main(["result", "req-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad settings: " in err and setting.removeprefix("STREAMFOLD_").lower() in err.lower()


def test_a_missing_capture_file_is_one_line_on_stderr(env_free: None, capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    assert main(["replay", str(tmp_path / "missing.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.jsonl" in err


@pytest.fixture
def env_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STREAMFOLD_* from the outside: the defaults apply."""
    for name in list(os.environ):
        if name.startswith("STREAMFOLD_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("command", ["result", "results", "usage", "replay"])
def test_every_command_help_says_what_it_does_and_which_settings_apply(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for setting in ("STREAMFOLD_REDIS_URL", "STREAMFOLD_NAMESPACE", "STREAMFOLD_SHARDS"):
        assert setting in out
    assert len(out.split("\n\n")[1]) > 40  # the description paragraph


def test_mock_upstream_is_a_subcommand_with_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["mock-upstream", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m producer mock-upstream")
    assert "X-Mock-Disconnect-After" in out and "``" not in out
    assert "mock-upstream" in subprocess.run([sys.executable, "-m", "producer", "--help"], cwd=ROOT,
                                             capture_output=True, text=True, timeout=30).stdout


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["replay", "x.jsonl", "--copies", "0"], ["replay", "x.jsonl", "--rate", "-1"], ["nope"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    capsys.readouterr()
