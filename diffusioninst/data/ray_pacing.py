"""A minimum period for Ray Data's scheduling loop, so that an idle executor does not spin.

Ray Data runs each execution's control loop in a thread: in the driver, or, for a training dataset fed to
Ray Train workers through ``streaming_split``, in the ``SplitCoordinator`` actor. A step blocks in
``ray.wait(timeout=0.1)`` only while some dispatched task is still running. When every dispatched task has
produced its blocks and the consumers are what limits progress (the read operator's output is
back-pressured, or the epoch's reads are all done), no step waits for anything and the loop re-plans the
same state a few hundred times a second. On the 2-core box, with 2 training consumers of 600-image
epochs, that was ~200 steps/s and 17-18% of a core in the coordinator, taken from the consumers that share
the two cores.

:class:`PacedSchedulingLoop` is a Ray Data execution callback that sleeps for the rest of ``min_step_s``
when a step ends sooner. Steps that waited for tasks already last longer and are not delayed, and a block
is not delayed on its way to a consumer (consumers pull from the output queue through the coordinator's
RPC threads). Training ingest uses it (``data.ray_scheduling_period_ms``, default 10 ms; docs/data.md has
the measurements); preprocessing does not: its map tasks are short, each step that dispatches one is
short too, and there the pause only delays the next task.

The callback interface (``ExecutionCallback``, ``DataContext.custom_execution_callback_classes``) is a Ray
Data developer API, present in the Ray versions ``pyproject.toml`` admits; where it is missing,
:func:`pace_scheduling_loop` leaves the dataset unpaced.
"""

from __future__ import annotations

import time

try:  # Ray Data developer API (Ray >= 2.59)
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # pragma: no cover - older or newer Ray layouts: no pacing
    ExecutionCallback = None  # type: ignore[assignment,misc]

MIN_STEP_KEY = "diffusioninst.min_scheduling_step_s"
DEFAULT_MIN_STEP_S = 0.01


class PacedSchedulingLoop(ExecutionCallback or object):  # type: ignore[misc]
    """Ray Data execution callback: each scheduling step lasts at least ``min_step_s`` seconds.

    Ray instantiates it with no arguments for every execution; the period comes from the dataset's
    ``DataContext`` (key :data:`MIN_STEP_KEY`, set by :func:`pace_scheduling_loop`). ``clock`` and
    ``sleep`` are injectable for tests.
    """

    def __init__(self, clock=time.perf_counter, sleep=time.sleep):
        self._clock, self._sleep = clock, sleep
        self._last: float | None = None
        self.min_step_s = DEFAULT_MIN_STEP_S

    def before_execution_starts(self, executor) -> None:
        ctx = getattr(executor, "_data_context", None)
        if ctx is not None:
            self.min_step_s = float(ctx.get_config(MIN_STEP_KEY, DEFAULT_MIN_STEP_S))
        self._last = None

    def on_execution_step(self, executor) -> None:
        now = self._clock()
        if self._last is not None:
            remaining = self.min_step_s - (now - self._last)
            if remaining > 0:
                self._sleep(remaining)
                now = self._clock()
        self._last = now


def pace_scheduling_loop(ds, min_step_s: float = DEFAULT_MIN_STEP_S):
    """Give ``ds`` (and the datasets derived from it) a scheduling loop of at least ``min_step_s`` per step.

    Changes only the dataset's own ``DataContext`` copy, never the global one. ``min_step_s <= 0``, or a
    Ray without the callback API, leaves ``ds`` unpaced. Returns ``ds``.
    """
    ctx = ds.context
    if min_step_s <= 0 or ExecutionCallback is None or not hasattr(ctx, "custom_execution_callback_classes"):
        return ds
    ctx.set_config(MIN_STEP_KEY, float(min_step_s))
    if PacedSchedulingLoop not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, PacedSchedulingLoop]
    return ds
