"""``make demo``: the whole story, end to end, on one machine.

A backend enqueues chat completions through rq; a call runner (``python -m producer work``) streams each from
an OpenAI-compatible upstream - here the mock upstream replaying recorded streams, some with injected faults -
onto Redis; a stream worker (``python -m worker run``) assembles every request into one result. The demo waits
for each result, prints one line per request, then sums the usage events per model, and shuts everything down.

Redis: ``STREAMFOLD_REDIS_URL`` when set (the demo uses a namespace of its own and removes it afterwards).
Otherwise an embedded fakeredis server on a free loopback port, checked first to really serve rq and the
worker's Lua scripts; if it cannot, ``redis-server`` on a free port when one is installed.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import redis
from rq import Queue, SimpleWorker

from producer import cancel, enqueue_chat_completion, wait_for_result
from producer.analytics import format_table, summarize
from producer.jobs import job_id
from producer.mock_upstream import MockUpstream
from producer.publisher import Publisher
from producer.results import UsageReader, get_result
from streamfold.connection import connect
from streamfold.errors import StreamfoldError
from streamfold.settings import Settings
from worker.broker import Broker
from worker.runner import Worker

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "STREAMFOLD_DEMO_API_KEY"
RESULT_TIMEOUT = 60.0

# (fixture served by the mock as a model, upstream name, what the call shows)
CALLS = [
    ("qwen_mt_flash_incremental", "default", "incremental text"),
    ("qwen_mt_plus_cumulative", "qwen_mt", "cumulative text, upstream mode 'cumulative'"),
    ("doubao_tool_call_whole", "default", "a whole tool call in one chunk"),
    ("doubao_tool_call_fragments", "default", "a tool call in fragments"),
    ("openai_parallel_tool_calls", "default", "parallel tool calls"),
    ("deepseek_reasoner_tool_call", "default", "reasoning, then a tool call"),
    ("openai_refusal", "flaky", "connection cut after 3 chunks: retried as a new attempt"),
    ("openai_n3_multiple_choices", "rate_limited", "429 with Retry-After: 1, then served"),
    ("azure_prompt_filter_first_chunk", "broken", "HTTP 500 on every try: fails"),
    ("alibaba_qwen3max_reasoning", "slow", "cancelled by the backend"),
]
FAULTS = {
    "default": "", "qwen_mt": "",
    "flaky": "?mock_disconnect_after=3&mock_fail_times=1&mock_key=demo-flaky",
    "rate_limited": "?mock_status=429&mock_retry_after=1&mock_fail_times=1&mock_key=demo-429",
    "broken": "?mock_status=500",
    "slow": "?mock_latency_ms=50",
}


def main() -> int:
    with ExitStack() as stack:
        try:
            demo = stack.enter_context(pipeline())
            request_ids = enqueue_calls(demo)
            records = [wait_for_result(request_id, RESULT_TIMEOUT, client=demo.client, settings=demo.settings)
                       for request_id in request_ids]
        except StreamfoldError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        print_results(records)
        print_usage(demo.client, demo.settings, set(request_ids))
        return demo.stop()


@dataclass
class Demo:
    """The running pipeline: settings, a Redis client, the worker processes, and the requests enqueued."""

    settings: Settings
    client: redis.Redis
    processes: list[Background]
    request_ids: list[str]

    def stop(self) -> int:
        """Stop the workers; 0 when each exited cleanly, else 1 after showing the end of its log."""
        failed = [process for process in self.processes if process.stop() != 0]
        for process in failed:
            print(f"\n{process.name} exited {process.returncode}; its log:\n{process.log_tail()}", file=sys.stderr)
        return 1 if failed else 0


@contextmanager
def pipeline() -> Iterator[Demo]:
    """Redis, the mock upstream, a call runner and a stream worker, all stopped again on the way out."""
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        url, how = stack.enter_context(redis_for_demo())
        print(f"Redis: {how}")
        upstream = stack.enter_context(MockUpstream())
        table: dict[str, Any] = {name: {"base_url": upstream.base_url + query, "api_key_env": KEY_ENV}
                                 for name, query in FAULTS.items()}
        table["qwen_mt"]["mode"] = "cumulative"
        overrides: dict[str, Any] = {"redis_url": url, "namespace": namespace, "queue": namespace, "upstreams": table,
                                     "upstream_retries": 2, "upstream_backoff": 0.1}
        settings = Settings(**overrides)
        # The worker processes get the same settings through their environment.
        env = {**os.environ, **{f"STREAMFOLD_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
                                for name, value in overrides.items()},
               # The job runner reads the key from here; it is sent to the upstream and never enters Redis.
               KEY_ENV: "sk-demo-not-a-real-key"}
        client = stack.enter_context(connect(settings))
        demo = Demo(settings, client, [], [])
        if "STREAMFOLD_REDIS_URL" in os.environ:
            stack.callback(remove_namespace, client, settings, demo.request_ids)
        print(f"mock upstream: {upstream.base_url}; namespace {namespace}")
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamfold-demo-")))
        for name, command in (("call runner", ["producer", "work", "--log-level", "WARNING"]),
                              ("stream worker", ["worker", "run"])):
            demo.processes.append(stack.enter_context(background(name, [sys.executable, "-m", *command], env, logs)))
        print("started: python -m producer work (call runner), python -m worker run (stream worker)")
        yield demo


def enqueue_calls(demo: Demo) -> list[str]:
    """Enqueue every call as a backend would, and cancel the last one; returns the request ids."""
    print(f"\nenqueued {len(CALLS)} calls (the model names the recorded stream the mock upstream replays):")
    for model, upstream, shows in CALLS:
        params = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        demo.request_ids.append(enqueue_chat_completion(params, upstream=upstream, meta={"model": model},
                                                        client=demo.client, settings=demo.settings))
        print(f"  {model:<34} upstream {upstream:<13} {shows}")
    cancel(demo.request_ids[-1], client=demo.client, settings=demo.settings)
    print(f"  cancel({demo.request_ids[-1]}) sent\n")
    return list(demo.request_ids)


# --- printing ------------------------------------------------------------------------------------------------

def print_results(records: list[dict[str, Any]]) -> None:
    print(f"{'model':<34} {'status':<10} {'finish':<11} {'tokens':>6}  output")
    for record in records:
        choices = record["completion"].get("choices") or []
        finish = ",".join(sorted({str(choice.get("finish_reason")) for choice in choices})) or "-"
        tokens = (record["completion"].get("usage") or {}).get("total_tokens", "-")
        print(f"{record['meta']['model']:<34} {record['status']:<10} {finish:<11} {tokens:>6}  {preview(record)}")


def preview(record: dict[str, Any], width: int = 60) -> str:
    """What the request produced, in one short line: the error, text, a refusal, reasoning or tool calls."""
    error = record.get("error")
    if record["status"] == "failed" and error:
        text = f"error {error.get('type')}: {error.get('message')}"
    else:
        choices = record["completion"].get("choices") or [{}]
        message = choices[0].get("message") or {}
        calls = [f"{call['function']['name']}({call['function']['arguments']})"
                 for call in message.get("tool_calls") or []]
        parts = [message.get("content") or message.get("refusal") or "", *calls]
        text = " -> ".join(part for part in parts if part) or message.get("reasoning_content") or ""
        if len(choices) > 1:
            text = f"[{len(choices)} choices] {text}"
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def print_usage(client: redis.Redis, settings: Settings, request_ids: set[str]) -> None:
    """Summarise the usage events per model, read the way analytics reads them: through a consumer group."""
    events: list[dict[str, Any]] = []
    UsageReader(client, settings.keys, group="demo", consumer="demo", from_start=True).consume(
        lambda event: events.append(event) if event.get("request_id") in request_ids else None)
    print("\nusage by model (python -m producer usage --summary --by model)")
    print(format_table(summarize(events, by="model")), end="")


# --- processes -----------------------------------------------------------------------------------------------

@dataclass
class Background:
    """A subprocess of the demo, its output kept in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    returncode: int | None = None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (both workers drain and exit 0), then wait; kill if it does not go."""
        if self.returncode is None:
            self.process.terminate()
            try:
                self.returncode = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.returncode = self.process.wait()
        return self.returncode

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def background(name: str, command: list[str], env: dict[str, str], logs: Path) -> Iterator[Background]:
    log = logs / f"{name.replace(' ', '-')}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    running = Background(name, process, log)
    try:
        yield running
    finally:
        running.stop()


# --- Redis -------------------------------------------------------------------------------------------------

@contextmanager
def redis_for_demo() -> Iterator[tuple[str, str]]:
    """The Redis URL to use and a sentence saying where it came from."""
    url = os.environ.get("STREAMFOLD_REDIS_URL")
    if url:
        shown = re.sub(r"//[^@/]*@", "//***@", url)  # never print a password
        yield url, f"STREAMFOLD_REDIS_URL ({shown}), in a namespace of its own, removed afterwards"
        return
    with embedded_fakeredis() as url:
        problem = check_serves_streamfold(url)
        if problem is None:
            yield url, f"embedded fakeredis server at {url} (checked: serves rq and the worker's Lua scripts)"
            return
    binary = shutil.which("redis-server")
    if binary is None:
        raise StreamfoldError(f"the embedded fakeredis server cannot serve the demo ({problem}) and no redis-server "
                              "is installed; install one or set STREAMFOLD_REDIS_URL")
    with redis_server(binary) as url:
        yield url, f"redis-server at {url}, started for the demo (fakeredis could not serve it: {problem})"


def mended_handler(base: Any) -> Any:
    """fakeredis's TCP request handler with two of its defects (2.40) mended for the demo.

    It reports the client address as a Python tuple, which redis-py cannot parse in CLIENT INFO (rq asks at
    start-up); and it closes the connection after any error reply, where Redis answers and carries on - rq
    and the worker take errors such as NOSCRIPT, BUSYGROUP or an unknown INFO as plain replies. Only public
    names are imported; ``check_serves_streamfold`` tells whether the mended server works before it is used.
    """

    class Mended(base):  # type: ignore[misc]
        def setup(self) -> None:
            super().setup()
            info = getattr(self.current_client, "_client_info", None)
            for name in ("addr", "laddr"):
                if info is not None and isinstance(info.get(name), tuple):
                    info[name] = "%s:%d" % info[name][:2]

        def handle(self) -> None:
            read_command = self.current_client.read_response

            def answer_errors() -> Any:
                try:
                    return read_command()
                except redis.ResponseError as exc:
                    return exc  # written as an error reply; the connection stays open

            self.current_client.read_response = answer_errors
            super().handle()

    return Mended


@contextmanager
def embedded_fakeredis() -> Iterator[str]:
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_version=(7, 0))
    server.RequestHandlerClass = mended_handler(server.RequestHandlerClass)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def check_serves_streamfold(url: str) -> str | None:
    """Run one rq job and assemble one request (the worker's Lua finish) on ``url``; None when both work."""
    settings = Settings(redis_url=url, namespace="demo-check", shards=1)
    try:
        with connect(settings) as client:
            queue = Queue("demo-check", connection=client)
            job = queue.enqueue(operator.add, 1, 2)
            SimpleWorker([queue], connection=client).work(burst=True, logging_level="ERROR")
            if job.return_value() != 3:
                return f"an rq job ended {job.get_status()}"
            with Publisher(client, settings.keys) as publisher:
                publisher.start("check")
                publisher.push("check", b'{"choices": [{"index": 0, "delta": {"content": "ok"}, '
                                        b'"finish_reason": "stop"}]}')
                publisher.end("check")
            Worker(Broker.from_settings(client, settings, "demo-check"), settings, burst=True).run()
            record = get_result(client, settings.keys, "check")
            if record is None or record["status"] != "completed":
                return "the stream worker did not finish a request"
    except (redis.RedisError, StreamfoldError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextmanager
def redis_server(binary: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until_answers(url, process.poll)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def wait_until_answers(url: str, exited: Callable[[], int | None], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if exited() is not None or time.monotonic() > deadline:
                    raise StreamfoldError(f"redis-server did not start at {url}") from None
                time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def remove_namespace(client: redis.Redis, settings: Settings, request_ids: list[str]) -> None:
    """Delete what the demo wrote to a Redis it was given: its namespace, its queue and its jobs' rq keys."""
    for name in client.scan_iter(match=f"{settings.namespace}:*", count=1000):
        client.delete(name)
    ours = [settings.queue, *(job_id(settings.keys, request_id) for request_id in request_ids)]
    for name in client.scan_iter(match="rq:*", count=1000):
        if any(part in name.decode(errors="replace") for part in ours):
            client.delete(name)
    client.srem("rq:queues", f"rq:queue:{settings.queue}")


if __name__ == "__main__":
    sys.exit(main())
