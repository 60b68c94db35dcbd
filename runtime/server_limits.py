"""Admission control for the local server: one model generates one answer at a time, and only a
bounded number of requests may wait for it.

A `ModelQueue` hands out `Turn`s. A request first *joins* (refused at once when `1 + max_waiting`
requests are already in flight: the server answers 503 with Retry-After), then *waits* for its
turn (FIFO, on the event loop: a waiting request holds no worker thread, and a client that hangs
up while waiting leaves the queue at once), generates, and *releases* its turn when done.
"""
from __future__ import annotations

import anyio

DEFAULT_MAX_QUEUE = 8
DEFAULT_RETRY_AFTER_S = 1


class Turn:
    """One request's place in a model's queue; `release()` is idempotent."""

    def __init__(self, queue: "ModelQueue"):
        self._queue = queue
        self.active = False      # holds the model (after `wait`)
        self.released = False

    async def wait(self) -> None:
        """Wait (cancellably) until this request may use the model."""
        await self._queue._sem.acquire()
        self.active = True
        self._queue.waiting -= 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        q = self._queue
        if self.active:
            self.active = False
            q._sem.release()
        else:
            q.waiting -= 1
        q.in_flight -= 1


class ModelQueue:
    """At most one request using the model plus `max_waiting` waiting for it."""

    def __init__(self, max_waiting: int = DEFAULT_MAX_QUEUE):
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_waiting!r}")
        self.max_waiting = max_waiting
        self.in_flight = 0   # joined and not yet released (waiting + active)
        self.waiting = 0     # joined, not yet active
        self._sem = anyio.Semaphore(1)  # FIFO: waiters are served in arrival order

    def join(self) -> Turn | None:
        """A new Turn, or None when the queue is full (the caller answers 503)."""
        if self.in_flight >= 1 + self.max_waiting:
            return None
        self.in_flight += 1
        self.waiting += 1
        return Turn(self)

    def stats(self) -> dict:
        return {"in_flight": self.in_flight, "waiting": self.waiting, "max_queue": self.max_waiting}
