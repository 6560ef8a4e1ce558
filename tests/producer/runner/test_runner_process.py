"""The call runner as a process on a real Redis: calls overlap, cancels and retries hold under concurrency, a
runner killed with calls in flight loses none, SIGTERM drains, and rq's records stay true throughout.

Overlap is shown by the mock upstream's count of requests served at once, never by timing.
"""

from __future__ import annotations

import operator
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from rq import Queue
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.worker import Worker

from producer import cancel
from producer.runner.bridge import RqBridge
from tests.conftest import ROOT
from tests.producer.runner.rig import LONG, SHORT, Rig, rig, wait_until

# Real processes on a shared machine: a slow minute must not fail a test that is right.
pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]


@pytest.fixture
def pipeline(real_redis_url: str, namespace: str) -> Iterator[Rig]:
    with rig(real_redis_url, namespace) as the_rig:
        yield the_rig


def assert_exactly_one_result_each(pipeline: Rig, status: str = "completed") -> None:
    for request_id in pipeline.request_ids:
        assert pipeline.result(request_id)["status"] == status, request_id
        assert pipeline.published(request_id) == (1, 1), request_id


def assert_rq_finished(pipeline: Rig, count: int) -> None:
    queue = pipeline.settings.queue
    assert {pipeline.job(rid).get_status() for rid in pipeline.request_ids} == {JobStatus.FINISHED}
    assert FinishedJobRegistry(queue, connection=pipeline.client).count == count
    assert StartedJobRegistry(queue, connection=pipeline.client).count == 0
    assert Queue(queue, connection=pipeline.client).count == 0


def test_one_runner_carries_many_calls_at_once_each_ending_once_completed(pipeline: Rig) -> None:
    for _ in range(40):
        pipeline.enqueue(SHORT, "slow")  # 13 chunks, 100 ms apart: 1.3 s, long enough to overlap on a busy box
    runner = pipeline.runner("--burst", "--concurrency", "64", "--name", f"{pipeline.settings.namespace}-a")
    output = pipeline.finish(runner)
    assert runner.returncode == 0, output
    pipeline.assemble()

    assert pipeline.upstream.peak_connections == 40  # every call in flight at once, in one process
    assert_exactly_one_result_each(pipeline)
    assert_rq_finished(pipeline, 40)
    summary = pipeline.job(pipeline.request_ids[0]).return_value()
    assert summary == {"request_id": pipeline.request_ids[0], "upstream": "slow", "outcome": "ended", "calls": 1}
    assert "sk-runner-test" not in output


def test_cancels_and_retries_hold_while_calls_run_side_by_side(pipeline: Rig) -> None:
    flaky = [pipeline.enqueue(SHORT, "flaky") for _ in range(5)]
    limited = [pipeline.enqueue(SHORT, "rate_limited") for _ in range(3)]
    doomed = [pipeline.enqueue(LONG, "slow") for _ in range(5)]
    plain = [pipeline.enqueue(SHORT, "paced") for _ in range(10)]
    runner = pipeline.runner("--name", f"{pipeline.settings.namespace}-a")
    wait_until(lambda: all(pipeline.streaming(rid, 3) for rid in doomed), what="the slow calls to stream")
    for request_id in doomed:
        assert cancel(request_id, client=pipeline.client, settings=pipeline.settings) is True
    wait_until(lambda: all(pipeline.job(rid).get_status() == JobStatus.FINISHED for rid in pipeline.request_ids),
               what="every job to finish")
    output = pipeline.stop(runner)
    assert runner.returncode == 0, output
    pipeline.assemble()

    assert pipeline.upstream.peak_connections >= len(doomed) + len(plain)
    for request_id in flaky + limited + plain:
        record = pipeline.result(request_id)
        assert record["status"] == "completed" and pipeline.published(request_id) == (1, 1)
    assert {pipeline.result(rid)["metrics"]["attempts"] for rid in flaky} == {2}
    assert {pipeline.result(rid)["metrics"]["attempts"] for rid in limited} == {1}  # refused before any chunk
    for request_id in doomed:
        record = pipeline.result(request_id)
        assert (record["status"], record["error"]["type"]) == ("failed", "cancelled")
        assert record["metrics"]["chunks"] < 100 and pipeline.published(request_id) == (1, 1)


def test_a_runner_killed_with_calls_in_flight_loses_none_a_live_runner_reruns_them(pipeline: Rig) -> None:
    namespace = pipeline.settings.namespace
    calls = [pipeline.enqueue(LONG, "paced") for _ in range(12)]  # 275 chunks, 20 ms apart: 5.5 s each
    doomed = pipeline.runner("--name", f"{namespace}-doomed")
    wait_until(lambda: all(pipeline.streaming(rid, 5) for rid in calls), what="every call to stream")
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    survivor = pipeline.runner("--name", f"{namespace}-survivor")
    wait_until(lambda: all(pipeline.job(rid).get_status() == JobStatus.FINISHED for rid in calls), timeout=60,
               what="the survivor to finish every call")
    output = pipeline.stop(survivor)
    assert survivor.returncode == 0, output
    pipeline.assemble()

    assert_exactly_one_result_each(pipeline)
    for request_id in calls:
        record = pipeline.result(request_id)
        assert record["metrics"]["attempts"] == 2  # the re-run replaced the lost partial attempt whole
        assert record["warnings"][0].startswith("attempt 1 replaced attempt 0")
    assert_rq_finished(pipeline, len(calls))
    assert '"event":"calls_taken_over"' in output
    assert f"{namespace}-doomed" not in [worker.name for worker in Worker.all(connection=pipeline.client)]


def test_with_no_reruns_allowed_a_lost_call_fails_runner_lost_once(pipeline: Rig) -> None:
    namespace = pipeline.settings.namespace
    calls = [pipeline.enqueue(LONG, "paced") for _ in range(3)]
    doomed = pipeline.runner("--name", f"{namespace}-doomed")
    wait_until(lambda: all(pipeline.streaming(rid, 3) for rid in calls), what="every call to stream")
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    survivor = pipeline.runner("--name", f"{namespace}-survivor", STREAMFOLD_RUNNER_RERUNS="0")
    wait_until(lambda: all(pipeline.job(rid).get_status() == JobStatus.FAILED for rid in calls),
               what="the lost calls' jobs to fail")
    pipeline.stop(survivor)
    pipeline.assemble()

    for request_id in calls:
        record = pipeline.result(request_id)
        assert (record["status"], record["error"]["type"]) == ("failed", "runner_lost")
        assert pipeline.published(request_id) == (1, 1)
        assert "runner_lost" in str(pipeline.job(request_id).latest_result().exc_string)  # type: ignore[union-attr]
    assert FailedJobRegistry(pipeline.settings.queue, connection=pipeline.client).count == len(calls)


def test_sigterm_lets_the_calls_in_flight_finish_and_exits_0(pipeline: Rig) -> None:
    calls = [pipeline.enqueue(SHORT, "slow") for _ in range(8)]  # 13 chunks, 100 ms apart
    name = f"{pipeline.settings.namespace}-a"
    runner = pipeline.runner("--name", name)
    wait_until(lambda: all(pipeline.streaming(rid, 2) for rid in calls), what="every call to stream")
    # While the calls run, rq sees them running, on one worker: the runner.
    assert {pipeline.job(rid).get_status() for rid in calls} == {JobStatus.STARTED}
    assert StartedJobRegistry(pipeline.settings.queue, connection=pipeline.client).count == len(calls)
    (worker,) = [w for w in Worker.all(connection=pipeline.client) if w.name == name]
    assert {pipeline.job(rid).worker_name for rid in calls} == {name}
    output = pipeline.stop(runner)
    assert runner.returncode == 0, output
    pipeline.assemble()
    assert_exactly_one_result_each(pipeline)
    assert_rq_finished(pipeline, len(calls))
    assert '"event":"draining"' in output and "calls_handed_back" not in output


def test_sigterm_hands_back_what_outlasts_the_grace_and_a_peer_reruns_it(pipeline: Rig) -> None:
    namespace = pipeline.settings.namespace
    calls = [pipeline.enqueue(LONG, "paced") for _ in range(6)]
    leaving = pipeline.runner("--name", f"{namespace}-leaving", STREAMFOLD_SHUTDOWN_GRACE="0.5")
    wait_until(lambda: all(pipeline.streaming(rid, 3) for rid in calls), what="every call to stream")
    staying = pipeline.runner("--name", f"{namespace}-staying")
    output = pipeline.stop(leaving)
    assert leaving.returncode == 0, output
    assert '"event":"calls_handed_back"' in output
    wait_until(lambda: all(pipeline.job(rid).get_status() == JobStatus.FINISHED for rid in calls), timeout=60,
               what="the peer to finish the handed-back calls")
    pipeline.stop(staying)
    pipeline.assemble()
    assert_exactly_one_result_each(pipeline)
    assert_rq_finished(pipeline, len(calls))


def test_runners_lists_live_runners_and_check_fails_when_a_dead_ones_calls_wait(pipeline: Rig) -> None:
    namespace = pipeline.settings.namespace
    calls = [pipeline.enqueue(LONG, "paced") for _ in range(2)]
    runner = pipeline.runner("--name", f"{namespace}-a")
    wait_until(lambda: all(pipeline.streaming(rid, 2) for rid in calls), what="the calls to stream")

    def runners(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer", "runners", *args], env=pipeline.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=30)

    listed = runners()
    assert f"{namespace}-a" in listed.stdout and "live" in listed.stdout
    assert runners("--check").returncode == 0
    runner.send_signal(signal.SIGKILL)
    runner.communicate()
    wait_until(lambda: runners("--check").returncode == 1, what="the lease to expire")
    assert "no call runner holds a live lease; 2 calls wait to be taken over" in runners("--check").stderr


def test_a_job_that_is_not_a_streamfold_call_is_failed_never_run(pipeline: Rig, real_redis: redis.Redis) -> None:
    queue = Queue(pipeline.settings.queue, connection=pipeline.client)
    job = queue.enqueue(operator.add, 1, 2)
    bridge = RqBridge(pipeline.client, pipeline.settings.queue, f"{pipeline.settings.namespace}-bridge", heartbeat_s=30)
    bridge.join()
    try:
        taken, refused = bridge.take(10, None)
    finally:
        bridge.leave()
    assert taken == [] and [found.id for found, _ in refused] == [job.id]
    job.refresh()
    assert job.get_status() == JobStatus.FAILED and job.return_value() is None
    assert "not a Streamfold call: _operator.add" in str(job.latest_result().exc_string)  # type: ignore[union-attr]
    pipeline.request_ids.append(job.id)


def test_jobs_that_ended_together_are_marked_finished_in_rq_and_a_dependent_is_still_enqueued(pipeline: Rig) -> None:
    calls = [pipeline.enqueue() for _ in range(3)]
    queue = Queue(pipeline.settings.queue, connection=pipeline.client)
    dependent = queue.enqueue(operator.add, 1, 2, depends_on=pipeline.job(calls[2]))
    pipeline.request_ids.append(dependent.id)
    bridge = RqBridge(pipeline.client, pipeline.settings.queue, f"{pipeline.settings.namespace}-bridge", heartbeat_s=30)
    bridge.join()
    try:
        taken, _ = bridge.take(10, None)
        by_request = {str(item.kwargs["request_id"]): item for item in taken}
        bridge.succeed_all([(by_request[rid], {"request_id": rid}) for rid in calls[:2]])  # one transaction
        bridge.succeed_all([(by_request[calls[2]], {"request_id": calls[2]})])  # rq's own: it has a dependent
    finally:
        bridge.leave()
    finished = FinishedJobRegistry(pipeline.settings.queue, connection=pipeline.client)
    started = StartedJobRegistry(pipeline.settings.queue, connection=pipeline.client)
    for request_id in calls:
        job = pipeline.job(request_id)
        assert job.get_status() == JobStatus.FINISHED and job.return_value() == {"request_id": request_id}
        assert job.id in finished and job.id not in started
    assert dependent.get_status(refresh=True) == JobStatus.QUEUED
    assert int(pipeline.client.hget(bridge.worker.key, "successful_job_count") or 0) == 3


@pytest.fixture
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, so that it can be paused without stopping anyone else's."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server to pause")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_until(lambda: _answers(client), what="redis-server to start")
    client.close()
    try:
        yield url, server
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_calls_wait_out_a_redis_that_stops_answering_and_lose_neither_chunks_nor_attempts(
        private_redis: tuple[str, subprocess.Popen[bytes]], namespace: str) -> None:
    url, server = private_redis
    with rig(url, namespace) as pipeline:
        calls = [pipeline.enqueue(LONG, "paced") for _ in range(8)]  # 275 chunks, 20 ms apart
        runner = pipeline.runner("--name", f"{namespace}-a", STREAMFOLD_SOCKET_TIMEOUT="1")
        wait_until(lambda: all(pipeline.streaming(rid, 5) for rid in calls), what="every call to stream")
        server.send_signal(signal.SIGSTOP)  # Redis stops answering for longer than the runner's socket timeout
        time.sleep(3)
        server.send_signal(signal.SIGCONT)
        wait_until(lambda: all(pipeline.job(rid).get_status() == JobStatus.FINISHED for rid in calls), timeout=60,
                   what="every call to finish")
        output = pipeline.stop(runner)
        assert runner.returncode == 0, output
        pipeline.assemble()

        assert '"event":"redis_unavailable"' in output  # it did lose Redis for a while
        for request_id in calls:
            record = pipeline.result(request_id)
            assert record["status"] == "completed", request_id
            assert record["metrics"]["attempts"] == 1  # no upstream retry was spent on Redis
            assert record["metrics"]["chunks"] == 275 and record["warnings"] == []  # no chunk lost
            assert pipeline.published(request_id) == (1, 1)
        assert len(pipeline.upstream.requests_seen) == len(calls)


def test_a_taken_call_is_recorded_held_in_the_step_that_marks_its_job_started(pipeline: Rig) -> None:
    calls = [pipeline.enqueue() for _ in range(3)]
    held = pipeline.settings.keys.runner_calls(f"{pipeline.settings.namespace}-bridge")
    bridge = RqBridge(pipeline.client, pipeline.settings.queue, f"{pipeline.settings.namespace}-bridge", heartbeat_s=30,
                      held=held)
    bridge.join()
    try:
        taken, _ = bridge.take(10, None)  # a runner killed now leaves its calls where a takeover finds them
        assert pipeline.client.hgetall(held) == {rid.encode(): b"0" for rid in calls}
        bridge.succeed_all([(item, {}) for item in taken])
    finally:
        bridge.leave()
        pipeline.client.delete(held)


def test_a_job_a_dying_runner_moved_out_of_the_queue_is_put_back_and_run_once(pipeline: Rig) -> None:
    stranded = pipeline.enqueue()
    queue = Queue(pipeline.settings.queue, connection=pipeline.client)
    # A runner's dequeue moved it, and the runner died before marking it started.
    pipeline.client.lmove(queue.key, queue.intermediate_queue_key)
    runner = pipeline.runner("--name", f"{pipeline.settings.namespace}-live", STREAMFOLD_RUNNER_LEASE="2")
    wait_until(lambda: pipeline.job(stranded).get_status() == JobStatus.FINISHED, timeout=60,
               what="the stranded job to be put back and run")
    output = pipeline.stop(runner)
    pipeline.assemble()

    assert '"event":"jobs_requeued"' in output
    assert_exactly_one_result_each(pipeline)
    assert_rq_finished(pipeline, 1)
    assert pipeline.client.llen(queue.intermediate_queue_key) == 0
