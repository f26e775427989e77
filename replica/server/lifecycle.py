"""Readiness, requests in flight, and the drain that SIGTERM/SIGINT start.

States, in order: loading → ready → draining → stopped.
- `/ready` answers 200 only in `ready`; `/health` follows the engine process, not this state.
- In `draining` new work is refused with 503 while requests already admitted run to the end,
  for at most `drain_timeout_s`; those still running then are aborted (their streams end with
  finish_reason "abort", their blocks freed) and the process exits 0.
- A second SIGTERM/SIGINT during the drain ends it at once (the operator's "stop now", as a
  second Ctrl-C does in vLLM and uvicorn): the same abort, without the wait.
"""
import asyncio
import enum
import logging
import signal
from contextlib import contextmanager

log = logging.getLogger("replica.server")


class Phase(enum.IntEnum):
    LOADING = 0
    READY = 1
    DRAINING = 2
    STOPPED = 3


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.exit_code = 0                 # 1 once the engine died: the process must be restarted
        self.num_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop_requested = asyncio.Event()
        self._drain_cut = asyncio.Event()      # set by a second stop request

    @property
    def is_ready(self) -> bool:
        return self.phase == Phase.READY

    @property
    def is_draining(self) -> bool:
        return self.phase >= Phase.DRAINING

    def mark_ready(self) -> None:
        if self.phase == Phase.LOADING:
            self.phase = Phase.READY

    @contextmanager
    def track(self):
        """Counts one admitted HTTP request until its response is fully written."""
        self.num_in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self._idle.set()

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        name = signal.Signals(sig).name if sig is not None else "stop"
        if self.phase < Phase.DRAINING:
            log.info("%s: draining %d request(s) in flight", name, self.num_in_flight)
            self.phase = Phase.DRAINING
        elif not self._drain_cut.is_set():
            log.warning("%s again: ending the drain now (%d request(s) in flight are aborted)",
                        name, self.num_in_flight)
            self._drain_cut.set()
        self._stop_requested.set()

    def fail(self, reason: str) -> None:
        """The replica cannot serve any more (its engine died): stop, and exit non-zero so that
        fleetctl, Docker or Swarm restarts it."""
        log.error("%s: stopping with exit code 1", reason)
        self.exit_code = 1
        self._drain_cut.set()          # every request of the dead engine has failed already
        self.request_stop()

    async def wait_for_stop(self) -> None:
        await self._stop_requested.wait()

    async def drain(self, timeout_s: float, can_be_cut: bool = True) -> bool:
        """Waits until nothing is in flight; False when the timeout (or, if `can_be_cut`, a
        second stop request) came first."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if can_be_cut:
            waits.append(asyncio.ensure_future(self._drain_cut.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._idle.is_set()
