"""The call runner: Streamfold's upstream calls, hundreds at once per process, on one asyncio event loop.

    calls.py       what the calls of a process share, and a job's arguments turned into a Call
    call.py        one call's life: claim, start, attempts, retries, cancel (the rules every runner follows)
    publishing.py  one pipeline for every call's envelopes, flushed on size or on a short timer
    bridge.py      rq: jobs taken from the queue, marked started, finished and failed in rq's registries
    leases.py      the runner's lease, the calls it holds, and taking over the calls of a runner that died
    loop.py        the runner process: its loop, its timers and its drain
    metrics.py     Prometheus series and the stats record ``python -m producer runners`` shows
    view.py        ``python -m producer runners``: every runner, and a health check
"""
