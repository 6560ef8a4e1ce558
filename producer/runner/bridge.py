"""The runner as rq sees it: one registered rq worker that takes jobs itself and keeps rq's state true.

rq runs one job per worker process (rq's concurrency issue #45 is open). The runner instead takes jobs from
the queue with rq's own dequeue (``Queue.dequeue_any``: BLMOVE into rq's intermediate queue), marks each
started with rq's own execution records (``prepare_execution``, ``prepare_job_execution``: the job's status,
the StartedJobRegistry, the worker's execution index), keeps every started job's registry entry fresh
(``heartbeat_all``), and ends each with rq's own success or failure handling (result, FinishedJobRegistry or
FailedJobRegistry). So ``rq info``, rq-dashboard and ``Job.fetch`` show what is running, done and failed,
as they would for rq's own workers; ``rq worker`` keeps running the same jobs one at a time.

Every method here blocks on Redis: the runner calls them from threads, never on its event loop. Jobs whose
function is not ``producer.jobs.run_chat_completion`` are failed with a message saying so, never run.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.rate_limit import release_slot
from rq.registry import StartedJobRegistry
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

CALL_FUNCTION = "producer.jobs.run_chat_completion"
# How long an execution's registry entry lives without a heartbeat: rq's own margin over its interval.
EXECUTION_TTL_MARGIN = 60
REQUEUE_SCRIPT = resources.files("producer").joinpath("lua", "requeue.lua").read_text()


@dataclass
class Taken:
    """A job this runner started, with what rq needs to end it."""

    job: Job
    queue: Queue
    execution: Execution

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.job.kwargs)


class RunnerWorker(BaseWorker):
    """rq's BaseWorker, as registration and bookkeeping only: jobs run as calls on the runner's event loop."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        raise NotImplementedError("a call runner runs its jobs as calls, never through rq's execute_job")

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return int(self.job_monitoring_interval) + EXECUTION_TTL_MARGIN


class RqBridge:
    """The verbs the runner needs of rq; ``worker`` is the registered rq worker (its name is the runner's);
    ``held`` is the runner's calls hash, where the calls it takes are recorded as they are marked started."""

    def __init__(self, client: redis.Redis, queue: str, name: str, *, heartbeat_s: float,
                 held: str | None = None) -> None:
        self.client, self.held = client, held
        self.worker = RunnerWorker([queue], name=name, connection=client, job_monitoring_interval=int(heartbeat_s),
                                   worker_ttl=int(heartbeat_s) + EXECUTION_TTL_MARGIN)
        self.worker.log_result_lifespan = False
        self.queue = self.worker.queues[0]
        self._requeue = client.register_script(REQUEUE_SCRIPT)

    def join(self) -> None:
        """Register with rq. A registration of this name left by a process that died (a restart under the same
        ``--name``) is ended first: names are one runner's each."""
        self.forget_runner(self.worker.name)
        self.worker.register_birth()  # type: ignore[no-untyped-call]
        self.worker.set_state(WorkerStatus.IDLE)

    def leave(self) -> None:
        self.worker.register_death()  # type: ignore[no-untyped-call]

    def take(self, count: int, timeout: int | None) -> tuple[list[Taken], list[tuple[Job, str]]]:
        """Up to ``count`` jobs, waiting up to ``timeout`` seconds for the first (None: not at all), all marked
        started. Also returns the jobs refused (not Streamfold calls), already failed in rq.

        rq's own dequeue takes the first job (BLMOVE into rq's intermediate queue, as its workers do); the
        rest move the same way, and every job is marked started, in one round trip each rather than several
        per job, so that a runner taking hundreds of calls a second is not held up by its bookkeeping.
        """
        try:
            first = Queue.dequeue_any([self.queue], timeout, connection=self.client, job_class=self.worker.job_class,
                                      serializer=self.worker.serializer)
        except DequeueTimeout:
            first = None
        if first is None:
            return [], []
        jobs = [first[0], *self._dequeue_more(count - 1)]
        refused = [(job, problem) for job in jobs if (problem := foreign(job)) is not None]
        refused_ids = {job.id for job, _ in refused}
        calls = [str(job.kwargs.get("request_id")) for job in jobs if job.id not in refused_ids]
        taken = self._start_all(jobs, hold=calls)
        for job, problem in refused:
            self.fail(taken.pop(job.id), problem)
        return list(taken.values()), refused

    def _dequeue_more(self, count: int) -> list[Job]:
        """Up to ``count`` more jobs without waiting: moved as rq's dequeue moves them, then fetched."""
        if count <= 0:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for _ in range(count):
                pipe.lmove(self.queue.key, self.queue.intermediate_queue_key)
            ids = [raw.decode() for raw in pipe.execute() if raw is not None]
        if not ids:
            return []
        jobs = Job.fetch_many(ids, connection=self.client, serializer=self.worker.serializer)
        gone = [job_id for job_id, job in zip(ids, jobs) if job is None]
        for job_id in gone:  # deleted while queued: nothing to run, as rq's dequeue skips it
            self.queue.intermediate_queue.remove(job_id)
        return [job for job in jobs if job is not None]

    def _start_all(self, jobs: list[Job], hold: list[str] | None = None) -> dict[str, Taken]:
        """Mark jobs started, in one round trip: what rq's ``prepare_execution`` and ``prepare_job_execution``
        do for each (an execution record in the StartedJobRegistry and the worker's index, the job's status,
        out of the intermediate queue), with the worker's heartbeat once.

        ``hold``: request ids recorded in this runner's calls hash in the same transaction, so that a runner
        killed the moment after leaves them where a live runner's takeover finds them, rather than started in rq
        and held by no one."""
        worker, started = self.worker, {}
        with self.client.pipeline() as pipe:
            for job in jobs:
                ttl = worker.get_heartbeat_ttl(job)
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
                worker.executions[execution.id] = execution
                job.prepare_for_execution(worker.name, pipeline=pipe)
                pipe.persist(job.key)
                pipe.lrem(self.queue.intermediate_queue_key, 1, job.id)
                started[job.id] = Taken(job, self.queue, execution)
            if hold and self.held is not None:
                pipe.hset(self.held, mapping=dict.fromkeys(hold, 0))
            worker.heartbeat(worker.get_heartbeat_ttl(jobs[0]) + EXECUTION_TTL_MARGIN, pipeline=pipe)
            worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        return started

    def adopt(self, job_id: str) -> Taken | None:
        """A started job whose runner died, taken over: its old executions go, one of this worker's takes
        their place. None when the job is gone or already ended in rq."""
        try:
            job = Job.fetch(job_id, connection=self.client, serializer=self.worker.serializer)
        except NoSuchJobError:
            return None
        if job.get_status() not in (JobStatus.STARTED, JobStatus.QUEUED):
            return None
        registry = StartedJobRegistry(job.origin, connection=self.client)
        with self.client.pipeline() as pipe:
            for held_by, execution_id in registry.get_job_and_execution_ids(cleanup=False):
                if held_by == job.id:
                    Execution(execution_id, job.id, self.client).delete(job, pipe)
            pipe.execute()
        return self._start_all([job])[job.id]

    def succeed(self, taken: Taken, result: dict[str, Any]) -> None:
        """The job returned ``result``: rq's own success handling (result kept, FinishedJobRegistry)."""
        job = taken.job
        job.ended_at = now()
        job._result = result  # what rq's handle_job_success stores as the job's result
        job._status = JobStatus.FINISHED
        self.worker.handle_job_success(job, taken.queue, taken.queue.started_job_registry, taken.execution)

    def succeed_all(self, ended: list[tuple[Taken, dict[str, Any]]]) -> None:
        """Jobs that returned, each with its result: what ``succeed`` does for each, in one transaction for all.

        rq's own success handling costs each job three round trips (a WATCH on its dependents, their read,
        the transaction). Streamfold's calls have no dependents and no repeats as a rule: their records are
        written here in one MULTI after one read, under a WATCH on every job's dependents key, so that a
        dependent added meanwhile sends them all back to rq's own handling, as would a job that has
        dependents or repeats to start with.
        """
        worker, keys = self.worker, [taken.job.dependents_key for taken, _ in ended]
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(*keys)  # type: ignore[no-untyped-call]
                if pipe.exists(*keys) or any(taken.job.repeats_left for taken, _ in ended):
                    raise redis.WatchError("a job has dependents or repeats to see to")
                pipe.multi()
                for taken, result in ended:
                    job = taken.job
                    job.ended_at = now()
                    job._result = result
                    job._status = JobStatus.FINISHED
                    worker.increment_successful_job_count(pipeline=pipe)
                    worker.increment_total_working_time(job.ended_at - job.started_at, pipe)  # type: ignore[operator]
                    ttl = job.get_result_ttl(worker.default_result_ttl)
                    if ttl != 0:
                        job._handle_success(ttl, pipeline=pipe, worker_name=worker.name,
                                            execution_id=taken.execution.id,
                                            execution_started_at=taken.execution.created_at,
                                            execution_ended_at=job.ended_at)
                    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
                    worker.cleanup_execution(job, pipeline=pipe, execution=taken.execution)
                pipe.execute()
            except redis.WatchError:
                for taken, result in ended:
                    self.succeed(taken, result)
                return
        for taken, _ in ended:
            release_slot(taken.job)

    def fail(self, taken: Taken, message: str) -> None:
        """The job failed with ``message``: rq's own failure handling (FailedJobRegistry, the failure kept)."""
        job = taken.job
        job.ended_at = now()
        job._status = JobStatus.FAILED
        self.worker.handle_job_failure(job, taken.queue, exc_string=message, execution=taken.execution)

    def requeue(self, taken: Taken) -> None:
        """Put a job taken but never run back at the front of its queue (a drain that took it too late)."""
        with self.client.pipeline() as pipe:
            self.worker.cleanup_execution(taken.job, pipe, taken.execution)
            taken.job.set_status(JobStatus.QUEUED, pipeline=pipe)
            pipe.execute()
        taken.queue.push_job_id(taken.job.id, at_front=True)

    def requeue_stranded(self, seen: dict[str, float], after_s: float, now: float) -> list[str]:
        """Jobs a dequeue moved out of the queue and never marked started - its runner died between the two
        round trips - put back at the front of the queue (producer/lua/requeue.lua) once this runner has seen
        them stranded for ``after_s`` seconds, far longer than a live runner takes between the two. ``seen``
        (job id -> when first seen) is the caller's memory between passes. Returns the jobs put back.

        rq's own clean-up would fail them after a minute or more, and the request would never get a result.
        A live runner that stalls longer than ``after_s`` between its take and its start (its lease still held)
        would find its job put back and run by a peer too: the request still gets one result, but the upstream
        is called twice.
        """
        stranded = {raw.decode() if isinstance(raw, bytes) else raw
                    for raw in self.client.lrange(self.queue.intermediate_queue_key, 0, -1)}
        for job_id in set(seen) - stranded:
            del seen[job_id]
        requeued = []
        for job_id in stranded:
            if now - seen.setdefault(job_id, now) >= after_s:
                del seen[job_id]
                if self._requeue(keys=[self.queue.intermediate_queue_key, self.queue.key], args=[job_id]):
                    requeued.append(job_id)
        return requeued

    def heartbeat_all(self, held: list[Taken]) -> None:
        """Keep the worker's registration and every started job's registry entry fresh, in one round trip."""
        ttl = self.worker.get_heartbeat_ttl(held[0].job) if held else self.worker.worker_ttl
        with self.client.pipeline() as pipe:
            self.worker.heartbeat(ttl + EXECUTION_TTL_MARGIN, pipeline=pipe)
            for taken in held:
                taken.execution.heartbeat(taken.queue.started_job_registry, ttl, pipeline=pipe)
                taken.job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()
        self.worker.set_state(WorkerStatus.BUSY if held else WorkerStatus.IDLE)

    def clean_registries(self) -> None:
        """rq's periodic maintenance, as every rq worker takes its turn at it."""
        self.worker.clean_registries()  # type: ignore[no-untyped-call]

    def forget_runner(self, name: str) -> None:
        """Register the death of another runner's rq worker, found dead by its lease, so ``rq info`` stops
        listing it at once instead of after its key expires."""
        key = f"{BaseWorker.redis_worker_namespace_prefix}{name}"
        other = BaseWorker.find_by_key(key, connection=self.client)
        if other is not None and other.death_date is None:
            other.register_death()  # type: ignore[no-untyped-call]


def foreign(job: Job) -> str | None:
    """Why a job is not one a call runner may run, or None when it is a Streamfold call."""
    try:
        name = job.func_name
    except Exception as exc:  # noqa: BLE001  (rq raises whatever its serializer raised)
        return f"job data cannot be read ({type(exc).__name__}); a call runner runs only {CALL_FUNCTION} jobs"
    if name != CALL_FUNCTION:
        return (f"not a Streamfold call: {name}; a call runner runs only {CALL_FUNCTION} jobs "
                "(run other jobs with rq worker on a queue of their own)")
    return None
