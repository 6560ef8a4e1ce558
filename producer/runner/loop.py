"""``python -m producer work``: one process, one event loop, up to ``--concurrency`` upstream calls at once.

The loop takes jobs from rq's queue while it has room and starts a task per call; beside it, on timers, it
renews the runner's lease (and stats record), keeps rq's records of its started jobs fresh, and takes over
the calls of runners whose lease expired. Blocking rq calls run in threads, never on the loop.

Each call task: record the call in the lease's hash, run it (producer/runner/call.py) within the job's
timeout, mark the rq job finished or failed, forget the call. SIGTERM drains: no new jobs, calls in flight
finish for up to ``STREAMFOLD_SHUTDOWN_GRACE`` seconds, the rest are handed back (the lease ends at once, a
peer re-runs them); a second signal hands back at once. A runner that finds its lease gone drops its calls
without a word to Redis or rq: the peer that took them owns them now.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import signal
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from producer.jobs import job_id
from producer.runner.bridge import RqBridge, Taken
from producer.runner.call import Call, crash_error
from producer.runner.calls import Calls
from producer.runner.leases import Lease, LeaseLost
from producer.runner.metrics import RunnerMetrics
from producer.runner.publishing import Discarded, patiently
from streamfold.contract import ErrorInfo
from streamfold.errors import RedisRefused
from streamfold.logs import EventLog
from streamfold.settings import Settings
from streamfold.tasks import cancel_and_wait

log = logging.getLogger("streamfold.runner")
T = TypeVar("T")

DEQUEUE_WAIT_S = 1  # longest a dequeue blocks: how soon an idle runner sees a stop or a timer
# Jobs taken per turn: the calls of a turn start together once all its jobs are marked started in rq, so a
# long turn would hold the first job back while the later ones are taken.
TAKE_AT_ONCE = 32
HEARTBEAT_LEASES = 3  # rq's records of started jobs are refreshed every this many lease lengths
MAINTENANCE_S = 600.0  # rq's registry clean-up, as often as rq's own workers do it


@dataclass
class Held:
    """A call this runner holds: its rq job, and the task carrying it."""

    taken: Taken
    task: asyncio.Task[None]


class Runner:
    """A call runner. ``aclient`` (asyncio) carries the calls; ``client`` (blocking) is rq's, used in threads."""

    def __init__(self, settings: Settings, client: redis.Redis, aclient: redis.asyncio.Redis, *, name: str,
                 concurrency: int | None = None, burst: bool = False) -> None:
        self.settings, self.name, self.burst = settings, name, burst
        self.concurrency = concurrency or settings.runner_concurrency
        self.metrics = RunnerMetrics(self.concurrency)
        self.bridge = RqBridge(client, settings.queue, name, heartbeat_s=settings.runner_lease * HEARTBEAT_LEASES,
                               held=settings.keys.runner_calls(name))
        self.lease = Lease(aclient, settings.keys, name, settings.runner_lease)
        self.calls = Calls(settings, aclient, connections=self.concurrency, gate=self.lease.check, hooks=self.metrics)
        self.metrics.watch_in_flight(lambda: len(self._held))
        self._held: dict[str, Held] = {}
        self._held_key = settings.keys.runner_calls(name)
        self._stranded: dict[str, float] = {}  # job id -> when first seen in rq's intermediate queue
        self._ended: list[tuple[Taken, dict[str, Any], asyncio.Future[None]]] = []  # jobs to mark succeeded
        self._ending: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._drain_until: float | None = None
        self._idle = False
        self._handed_back = False
        now = time.monotonic()
        self._next = {"lease": now + settings.runner_lease / 4, "heartbeat": now, "maintenance": now}
        self._log = EventLog(log, worker=name)
        self._threads = (ThreadPoolExecutor(1, "rq-take"), ThreadPoolExecutor(2, "rq"))

    async def run(self) -> int:
        """Serve until drained (or, in burst mode, until nothing is left to do); returns the exit code, 0."""
        async with self._serving():
            while not self._finished():
                await self._take_jobs()
            await self._drain()
        return 0

    def stop(self) -> None:
        """Stop taking jobs and drain; a second call hands back what is in flight at once."""
        now = time.monotonic()
        if self._drain_until is None:
            self._drain_until = now + self.settings.shutdown_grace
            self._log.info("draining", in_flight=len(self._held), grace_s=self.settings.shutdown_grace)
        else:
            self._drain_until = now
        self._room.set()

    def dump_tasks(self) -> None:
        """Log where every task of the loop waits (SIGUSR1): what a runner that seems stuck is waiting for."""
        for task in asyncio.all_tasks():
            stack = io.StringIO()
            task.print_stack(limit=12, file=stack)
            self._log.warning("task_stack", task=task.get_name(), stack=stack.getvalue())

    # --- steps -----------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGUSR1, self.dump_tasks)
        await self._rq(self.bridge.join)
        await self.lease.join()
        self._log.info("runner_started", concurrency=self.concurrency, queue=self.settings.queue, burst=self.burst)
        # The timers run beside the loop that takes jobs, so that neither waits for the other; they go on
        # through a drain, which needs the lease renewed while the last calls finish.
        timers = asyncio.create_task(self._keep_up_forever(), name="timers")
        try:
            async with self.calls:
                yield
        finally:
            # Every call that ended has seen its job marked; what is left is for calls handed back.
            await cancel_and_wait(timers, self._ending)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await self._leave()

    async def _take_jobs(self) -> None:
        """Take jobs up to the free capacity; with none free, wait for a call to end (or for a stop)."""
        free = self.concurrency - len(self._held)
        if free <= 0:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), DEQUEUE_WAIT_S)
            except TimeoutError:
                pass
            return
        wait = None if self.burst else DEQUEUE_WAIT_S
        try:
            taken, refused = await self._rq(self.bridge.take, min(free, TAKE_AT_ONCE), wait, dequeue=True)
        except redis.RedisError as exc:
            await self._redis_trouble(exc)
            return
        for job, problem in refused:
            self._log.error("job_refused", job=job.id, error=problem)
        for item in taken:
            self._carry(item, reruns=0, adopted=False)
        self._idle = not taken and not refused and not self._held
        if self.burst and not taken and self._held:
            await asyncio.sleep(0.05)  # burst with calls in flight: the queue is empty, let them run

    async def _keep_up_forever(self) -> None:
        while True:
            await asyncio.sleep(self._until_next())
            try:
                await self._keep_up()
            except Exception:  # noqa: BLE001  (a fault in one turn must not stop the lease being renewed)
                self._log.exception("runner_fault")
                await asyncio.sleep(1.0)

    async def _keep_up(self) -> None:
        """Whatever is due: the lease and stats record, rq's records of started jobs, takeovers, clean-up."""
        now = time.monotonic()
        try:
            if self.lease.lost:
                await self._lost()
            if now >= self._next["lease"]:
                await self.lease.renew()
                await self.lease.publish(self.metrics.record(len(self._held)))
                await self._take_over()
                await self._requeue_stranded(now)
                self._next["lease"] = now + self.settings.runner_lease / 4
            if now >= self._next["heartbeat"]:
                await self._rq(self.bridge.heartbeat_all, [held.taken for held in self._held.values()])
                self._next["heartbeat"] = now + self.settings.runner_lease * HEARTBEAT_LEASES
            if now >= self._next["maintenance"]:
                await self._rq(self.bridge.clean_registries)
                self._next["maintenance"] = now + MAINTENANCE_S
        except LeaseLost:
            await self._lost()
        except redis.RedisError as exc:
            await self._redis_trouble(exc)

    async def _drain(self) -> None:
        """Let the calls in flight finish until the drain's end; hand back what is left."""
        while self._held and self._drain_until is not None and time.monotonic() < self._drain_until:
            tasks = [held.task for held in self._held.values()]
            # Short waits, so that a second signal (the drain's end moved to now) hands back at once.
            await asyncio.wait(tasks, timeout=min(0.5, max(0.0, self._drain_until - time.monotonic())))
        if self._held:
            await self._hand_back()

    def _finished(self) -> bool:
        if self._drain_until is not None:
            return True
        return self.burst and self._idle

    # --- calls -----------------------------------------------------------------------------------------

    def _carry(self, taken: Taken, *, reruns: int, adopted: bool) -> None:
        request_id = str(taken.kwargs.get("request_id"))
        task = asyncio.create_task(self._call(taken, request_id, reruns, adopted), name=f"call {request_id}")
        self._held[request_id] = Held(taken, task)

    async def _call(self, taken: Taken, request_id: str, reruns: int, adopted: bool) -> None:
        kwargs = taken.kwargs
        call, problem = self.calls.call(request_id, str(kwargs.get("upstream")), kwargs.get("params") or {},
                                        kwargs.get("meta") or {}, adopted=adopted)
        try:
            await self._hold(request_id, reruns)
            if reruns > self.settings.runner_reruns:
                outcome = await call.give_up(runner_lost(self.settings.runner_reruns))
                await self._mark(self.bridge.fail, taken, "runner_lost: the runner carrying this call stopped, and "
                                 f"its re-runs are used up ({reruns - 1})")
                self.metrics.ended("lost")
            else:
                async with asyncio.timeout(taken.job.timeout or self.settings.job_timeout):
                    outcome = await self.calls.run(call, problem)
                summary = {"request_id": request_id, "upstream": kwargs.get("upstream"), "outcome": outcome,
                           "calls": call.calls}
                await self._succeed(taken, summary)
                self.metrics.ended(outcome)
        except (asyncio.CancelledError, LeaseLost, Discarded):
            return  # handed back, or taken over by a peer: whoever has the call now ends it
        except Exception as exc:  # noqa: BLE001  (one call's fault stays its own)
            await self._crashed(taken, call, exc)
        finally:
            self._held.pop(request_id, None)
            self._room.set()
        await self._forget(request_id)

    async def _crashed(self, taken: Taken, call: Call, exc: Exception) -> None:
        """A call that crashed (the Call published its failure) or ran out of time (published here): its rq
        job fails too, with the traceback or the timeout where rq keeps failures."""
        self.metrics.ended("error")
        text = "".join(traceback.format_exception(exc))
        if isinstance(exc, TimeoutError):
            text = f"JobTimeoutException: the call ran longer than its job timeout ({taken.job.timeout} s)"
            try:
                await call.stream.fail(crash_error(exc))
            except (redis.RedisError, RedisRefused, Discarded) as problem:
                self._log.error("failure_not_published", request_id=call.request_id, error=str(problem))
        self._log.error("call_failed", request_id=call.request_id, error=text.splitlines()[-1])
        await self._mark(self.bridge.fail, taken, text)

    async def _hold(self, request_id: str, reruns: int) -> None:
        """Record a call in the lease's hash (``Lease.hold``) before it publishes anything: through the shared
        batch, so that the record rides the same round trip as the call's claim and start, ahead of them."""
        await self.calls.batcher.send((("HSET", self._held_key, request_id, reruns),))

    async def _forget(self, request_id: str) -> None:
        """Forget a call whose rq job is marked (``Lease.release``), in the next batch: nothing waits for it."""
        await self.calls.batcher.send((("HDEL", self._held_key, request_id),))

    # --- takeover, lease, leaving ----------------------------------------------------------------------

    async def _take_over(self) -> None:
        """Take the calls of runners whose lease expired, as many as there is room for, and re-run them."""
        if self._drain_until is not None:
            return
        for peer in await self.lease.expired_peers():
            free = self.concurrency - len(self._held)
            if free <= 0:
                return
            adopted = await self.lease.take_over(peer, free)
            if adopted or not await self.lease.client.zscore(self.settings.keys.runner_leases(), peer):
                await self._rq(self.bridge.forget_runner, peer)
            if adopted:
                self._log.warning("calls_taken_over", runner=peer, count=len(adopted))
            for request_id, reruns in adopted:
                taken = await self._rq(self.bridge.adopt, job_id(self.settings.keys, request_id))
                if taken is None:
                    await self._forget(request_id)  # its job ended in rq meanwhile: nothing to re-run
                    continue
                if reruns <= self.settings.runner_reruns:
                    self.metrics.rerun()
                self._log.info("call_adopted", request_id=request_id, runner=peer, reruns=reruns)
                self._carry(taken, reruns=reruns, adopted=True)

    async def _requeue_stranded(self, now: float) -> None:
        """Put back jobs a runner moved out of the queue and died before marking started (RqBridge)."""
        requeued = await self._rq(self.bridge.requeue_stranded, self._stranded, self.settings.runner_lease, now)
        if requeued:
            self._log.warning("jobs_requeued", count=len(requeued), jobs=requeued)

    async def _lost(self) -> None:
        """Our lease is gone and a peer has our calls: drop them all, then serve on under a new lease."""
        self._log.error("lease_lost", dropped=len(self._held))
        await self._cancel_all()
        await self.lease.join()

    async def _hand_back(self) -> None:
        self._log.warning("calls_handed_back", count=len(self._held), request_ids=list(self._held))
        await self._cancel_all()
        try:
            await self.lease.hand_back()
            self._handed_back = True
        except redis.RedisError as exc:
            self._log.error("hand_back_failed", error=str(exc))  # peers take them once the lease expires

    async def _cancel_all(self) -> None:
        await cancel_and_wait(*(held.task for held in self._held.values()))
        self._held.clear()

    async def _leave(self) -> None:
        try:
            async with asyncio.timeout(2 * self.settings.socket_timeout):  # leave, even from a silent Redis
                if not self._handed_back:
                    await self.lease.leave()
                await self._rq(self.bridge.leave)
        except (redis.RedisError, TimeoutError) as exc:
            self._log.warning("leave_failed", error=f"{type(exc).__name__}: {exc}")
        for pool in self._threads:
            pool.shutdown(wait=False, cancel_futures=True)
        self._log.info("runner_stopped")

    async def _redis_trouble(self, exc: redis.RedisError) -> None:
        self.metrics.redis_error()
        self._log.warning("redis_unavailable", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(0.5)

    async def _rq(self, verb: Callable[..., T], *args: Any, dequeue: bool = False) -> T:
        """Run a blocking rq verb on the runner's threads: one takes jobs (it blocks while the queue is empty),
        two do the rest. Few threads, not a large pool: every thread competes for the interpreter with the
        event loop, which carries the calls."""
        pool = self._threads[0 if dequeue else 1]
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(verb, *args))

    async def _succeed(self, taken: Taken, summary: dict[str, Any]) -> None:
        """Mark a job succeeded in rq, with the jobs of every other call that ended meanwhile: one
        ``succeed_all`` at a time, so that a busy runner ends many jobs a round trip and an idle one waits for
        no timer."""
        ended = asyncio.get_running_loop().create_future()
        self._ended.append((taken, summary, ended))
        if self._ending is None:
            self._ending = asyncio.create_task(self._end_jobs(), name="end jobs")
        await ended

    async def _end_jobs(self) -> None:
        try:
            while self._ended:
                batch, self._ended = self._ended, []
                jobs = [(taken, summary) for taken, summary, _ in batch]
                try:
                    await patiently(lambda: self._rq(self.bridge.succeed_all, jobs), "ending jobs in rq")
                except Exception as exc:  # noqa: BLE001  (each call hears its own job's trouble)
                    for *_, ended in batch:
                        if not ended.done():
                            ended.set_exception(exc)
                    continue
                for *_, ended in batch:
                    if not ended.done():
                        ended.set_result(None)
        finally:
            self._ending = None

    async def _mark(self, verb: Callable[[Taken, Any], None], taken: Taken, outcome: Any) -> None:
        """End a job in rq, waiting out a Redis that cannot serve for now: the call ended, and rq must say so."""
        await patiently(lambda: self._rq(verb, taken, outcome), "ending a job in rq")

    def _until_next(self) -> float:
        return max(0.01, min(self._next.values()) - time.monotonic())


def runner_lost(reruns: int) -> ErrorInfo:
    """The error of a request whose call was lost with its runner once more than it may be re-run."""
    return ErrorInfo(message=f"the call runner carrying this request stopped, and it may be re-run at most "
                             f"{reruns} times (STREAMFOLD_RUNNER_RERUNS)", type="runner_lost", status=None, code=None)
