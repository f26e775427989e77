"""AsyncEngine: the engine's step loop on its own thread, with an asyncio face for the server.

The event loop never waits on the model: requests and aborts go to the engine thread through a
lock-protected inbox, and each step's outputs come back in one `call_soon_threadsafe` that fills
the per-request asyncio queues. Leaving a `generate` loop early aborts the request.
"""
import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from replica.config import EngineConfig
from replica.engine.engine import LLMEngine
from replica.outputs import EngineStats, RequestOutput
from replica.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; the replica must be restarted."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.model_name = self.engine.model_name
        self.model_path = self.engine.model_path
        self.max_model_len = self.engine.max_model_len
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox_add: list[tuple[str, list[int], SamplingParams]] = []
        self._inbox_abort: list[str] = []
        self._inbox_calls: list[tuple] = []     # (function, future): run between steps (embed)
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._stats = self.engine.stats()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ---- requests ----------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        if self._stats.num_waiting + len(self._inbox_add) >= self.config.max_num_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_num_waiting} requests)")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        with self._lock:
            self._inbox_add.append((request_id, list(prompt_token_ids), params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine stopped while the request ran") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent; the request's blocks are freed at the next step boundary."""
        with self._lock:
            self._inbox_abort.append(request_id)
        self._wakeup.set()

    def stats(self) -> EngineStats:
        return self._stats

    async def embed(self, token_lists: list[list[int]], pooling: str | None = None) -> list[list[float]]:
        """`LLMEngine.embed` on the engine thread, between steps (issue 13)."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        future = self._loop.create_future()
        with self._lock:
            self._inbox_calls.append((lambda: self.engine.embed(token_lists, pooling), future))
        self._wakeup.set()
        return await future

    def _run_calls(self, calls: list[tuple]) -> None:
        for fn, future in calls:
            try:
                result, error = fn(), None
            except ValueError as err:
                result, error = None, err
            except BaseException:
                _settle_threadsafe = self._loop.call_soon_threadsafe
                _settle_threadsafe(_settle, future, None, EngineDeadError("the engine stopped"))
                raise
            self._loop.call_soon_threadsafe(_settle, future, result, error)

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                with self._lock:
                    adds, self._inbox_add = self._inbox_add, []
                    aborts, self._inbox_abort = self._inbox_abort, []
                    calls, self._inbox_calls = self._inbox_calls, []
                for request_id, prompt, params in adds:
                    try:
                        engine.add_request(request_id, prompt, params)
                    except ValueError as err:
                        self._deliver_error(request_id, err)
                for request_id in aborts:
                    engine.abort_request(request_id)
                self._run_calls(calls)
                if not engine.has_unfinished:
                    self._stats = engine.stats()
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                outputs = engine.step()
                self._stats = engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as err:  # the thread must report any death, whatever its kind
            log.exception("engine loop died")
            self._error = err
            self._loop.call_soon_threadsafe(self._fail_all, err)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _deliver_error(self, request_id: str, err: Exception) -> None:
        def put():
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(err)
        self._loop.call_soon_threadsafe(put)

    def _fail_all(self, err: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(err)
        with self._lock:
            calls, self._inbox_calls = self._inbox_calls, []
        for _, future in calls:
            _settle(future, None, EngineDeadError("the engine stopped"))


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():          # its caller may have gone (cancelled)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
