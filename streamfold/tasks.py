"""Stopping asyncio tasks for certain.

On Python 3.11, ``asyncio.wait_for`` loses a cancel that arrives while the operation it waits for has already
completed (CPython gh-86296, fixed in 3.12): the task goes on as if it had never been cancelled. Streamfold's
own Redis connections avoid it (``streamfold.connection.LoopConnection``), but a task may await through other
code that uses ``wait_for``, and a background loop that survives its cancel runs for ever: a process waiting
for it never exits. ``cancel_and_wait`` cancels again until the task is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL_S = 0.25  # how long a cancelled task may take to end before it is cancelled again


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None, every: float = RECANCEL_S) -> None:
    """Cancel ``tasks`` (None entries are skipped) and wait until each is done, cancelling again every
    ``every`` seconds any that went on. What the tasks raised is retrieved and dropped."""
    given = [task for task in tasks if task is not None]
    pending = {task for task in given if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    await asyncio.gather(*given, return_exceptions=True)
