"""AsyncEngine: the server's face of an engine core that runs in its own child process.

    server process (event loop)                          core process (core_proc.py)
    ──────────────────────────                           ──────────────────────────
    generate() ─ validate, OutputProcessor.add_request
               ─ CoreInputs (all adds and stops of one loop tick) ──▶ scheduler, runner, sampler
    reader task ◀── CoreOutputs (one per step: token ids, stats) ───  step()
               ─ OutputProcessor.process: text, stop strings ─▶ per-request asyncio queues

The event loop never waits on the model and the core never waits on HTTP: tokenisation,
detokenisation, stop strings and JSON live here, the step loop there, and each side owns its
state (the core: sequences, blocks; this side: text, queues). Leaving a `generate` loop early
aborts the request; the core frees its blocks at its next step.

If the core process dies, `is_alive` turns False at once, every open stream gets EngineDeadError,
and `on_core_death` (set by the server) runs, so that the replica exits non-zero and is restarted.
"""
import asyncio
import logging
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from replica.config import EngineConfig
from replica.engine.core_launch import CoreLaunch
from replica.engine.core import load_tokenizer, resolve_max_model_len, validate_request
from replica.engine.messages import (HANDSHAKE, AddRequest, CoreFailed, CoreInputs, CoreOutputs,
                                     CoreStart, EmbedRequest, SeqStop)
from replica.engine.output_processor import OutputProcessor
from replica.models.loader import open_checkpoint
from replica.models.registry import default_served_name
from replica.outputs import EngineStats, RequestOutput
from replica.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_STARTUP_POLL_MS = 200
# The core reads `shutdown` between steps and exits at once (no teardown: core_proc.py); one that
# has not within this is stuck and is killed. fleetctl gives a replica 5 s beyond its drain before
# Docker or Swarm kill it, and the server's own stop needs about 1 s of those.
_CORE_EXIT_WAIT_S = 3.0


class EngineDeadError(RuntimeError):
    """The engine core stopped; the replica must be restarted."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, launch: CoreLaunch | None = None):
        """Starts the core process (or takes one started early, `launch`, which stays the caller's
        to kill if this raises) and waits until it has loaded the model. Raises ValueError for
        settings the core refused, RuntimeError when it failed otherwise."""
        self.config = config
        checkpoint = open_checkpoint(config.model, config.load_format)
        self.model_config = checkpoint.config
        self.model_path = checkpoint.path
        self.model_name = default_served_name(config.model)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.on_core_death: Callable[[], None] | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._outbox = CoreInputs([], [], [])
        self._embed_calls: dict[int, asyncio.Future] = {}
        self._next_call_id = 0
        self._is_flush_scheduled = False
        self._num_adds_since_stats = 0
        self._error: BaseException | None = None
        self._is_shutting_down = False
        self._is_refusing = False           # abort_all ran: the replica is stopping
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._spawn_core(launch)
        try:        # while the core imports torch and loads the weights
            self.tokenizer = load_tokenizer(checkpoint)
        except BaseException:
            self.process.kill()
            self.process.wait()
            self._close_core()
            raise
        self._processor = OutputProcessor(self.tokenizer)
        self._await_core()

    # ---- the core process ----------------------------------------------------------------------
    def _spawn_core(self, launch: CoreLaunch | None) -> None:
        self._launch = launch or CoreLaunch(is_omp_passive=self.config.resolve_device().type == "cpu")
        self._to_core, self._from_core = self._launch.to_core, self._launch.from_core
        self.process = self._launch.process
        self._to_core.send(self._encoder.encode(CoreStart(self.config)))

    def _await_core(self) -> None:
        ready = self._wait_for_handshake()
        self.device = ready.device
        self.dtype = ready.dtype
        self.load_s = ready.load_s
        self.num_kv_blocks = ready.num_blocks
        self.weights_device_bytes = ready.weights_device_bytes
        self.quantization = ready.quantization
        self.kv_cache_dtype = ready.kv_cache_dtype
        self._stats: EngineStats = ready.stats
        if ready.max_model_len != self.max_model_len:
            raise RuntimeError("the core and the front end disagree on max_model_len")

    def _wait_for_handshake(self):
        while not self._from_core.poll(_STARTUP_POLL_MS):
            if self.process.poll() is not None:
                self._close_core()
                raise RuntimeError(f"the engine core exited with {self.process.returncode} while loading")
        reply = msgspec.msgpack.decode(self._from_core.recv(), type=HANDSHAKE)
        if isinstance(reply, CoreFailed):
            self.process.wait(30)
            self._close_core()
            raise (ValueError if reply.is_config_error else RuntimeError)(reply.message)
        return reply

    def _close_core(self) -> None:
        self._launch.close()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Starts reading the core's outputs; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._reader = self._loop.create_task(self._read_outputs())
        threading.Thread(target=self._watch_core, name="core-watch", daemon=True).start()

    @property
    def is_alive(self) -> bool:
        return self._error is None and self.process.poll() is None

    async def shutdown(self) -> None:
        self._is_shutting_down = True
        if self.process.poll() is None:
            try:
                self._to_core.send(self._encoder.encode(CoreInputs(shutdown=True)), zmq.NOBLOCK)
                await asyncio.to_thread(self.process.wait, _CORE_EXIT_WAIT_S)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._close_core()

    def _watch_core(self) -> None:
        code = self.process.wait()
        self._loop.call_soon_threadsafe(self._on_core_exit, code)

    def _on_core_exit(self, code: int) -> None:
        if self._error is not None or self._is_shutting_down:
            return
        log.error("the engine core process exited with %s: failing %d open request(s)",
                  code, len(self._queues))
        self._fail_all(EngineDeadError(f"the engine core exited with {code}"))
        if self.on_core_death is not None:
            self.on_core_death()

    # ---- requests ----------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, vocab_size=self.model_config.vocab_size,
                         max_model_len=self.max_model_len, max_num_seqs=self.config.max_num_seqs,
                         has_tokenizer=self.tokenizer is not None)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not self.is_alive or self._is_refusing:
            raise EngineDeadError("the engine is not running")
        self.validate(prompt_token_ids, params)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        if self._stats.num_waiting + self._num_adds_since_stats >= self.config.max_num_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_num_waiting} requests)")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        arrival_s = time.monotonic()
        self._processor.add_request(request_id, prompt_token_ids, params, arrival_s)
        self._outbox.adds.append(AddRequest(request_id, list(prompt_token_ids), params, arrival_s))
        self._num_adds_since_stats += 1
        self._schedule_flush()
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
        """Idempotent; a consumer still reading gets a last output with finish_reason "abort".
        The core frees the request's blocks at its next step."""
        last = self._processor.abort(request_id)
        queue = self._queues.get(request_id)
        if last is not None and queue is not None:
            queue.put_nowait(last)
        self._outbox.stops.append(SeqStop(request_id, None, "abort"))
        self._schedule_flush()

    def abort_all(self) -> int:
        """Stops the engine taking work (`generate` raises EngineDeadError from now on) and
        aborts every open request, whose consumers get their last output at once; the count.
        The drain's end: streams then close with finish_reason "abort" instead of being cut."""
        self._is_refusing = True
        request_ids = list(self._queues)
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    def stats(self) -> EngineStats:
        return self._stats

    async def embed(self, token_lists: list[list[int]], pooling: str | None = None) -> list[list[float]]:
        """Unit vectors of the inputs' final hidden states, computed by the core between steps
        (no KV blocks). ValueError names a bad input."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        call_id, self._next_call_id = self._next_call_id, self._next_call_id + 1
        future = self._loop.create_future()
        self._embed_calls[call_id] = future
        self._outbox.embeds.append(EmbedRequest(call_id, token_lists, pooling))
        self._schedule_flush()
        try:
            return await future
        finally:
            self._embed_calls.pop(call_id, None)

    # ---- the two directions ------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        """Everything one loop tick adds or stops goes to the core as one message."""
        if not self._is_flush_scheduled and self._loop is not None:
            self._is_flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._is_flush_scheduled = False
        outbox, self._outbox = self._outbox, CoreInputs([], [], [])
        if (outbox.adds or outbox.stops or outbox.embeds) and self.is_alive:
            self._to_core.send(self._encoder.encode(outbox), copy=False)

    async def _read_outputs(self) -> None:
        decoder = msgspec.msgpack.Decoder(CoreOutputs)
        socket = zmq.asyncio.Socket.shadow(self._from_core.underlying)
        while True:
            frame = await socket.recv(copy=False)
            try:
                self._on_outputs(decoder.decode(frame.buffer))
            except Exception as err:      # a bug here must not leave clients waiting forever
                log.exception("processing the engine core's outputs failed")
                self._fail_all(err)
                if self.on_core_death is not None:
                    self.on_core_death()
                return

    def _on_outputs(self, message: CoreOutputs) -> None:
        self._stats = message.stats
        self._num_adds_since_stats = 0
        for error in message.errors:
            self._processor.forget(error.request_id)
            queue = self._queues.get(error.request_id)
            if queue is not None:
                queue.put_nowait(ValueError(error.message))
        for result in message.embeddings:
            future = self._embed_calls.get(result.call_id)
            if future is not None and not future.done():
                if result.error is not None:
                    future.set_exception(ValueError(result.error))
                else:
                    future.set_result(result.vectors)
        results, stops = self._processor.process(message.outputs)
        for out in results:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        if stops:
            self._outbox.stops += stops
            self._schedule_flush()

    def _fail_all(self, err: BaseException) -> None:
        self._error = err
        for queue in self._queues.values():
            queue.put_nowait(err)
        for future in self._embed_calls.values():
            if not future.done():
                future.set_exception(EngineDeadError("the engine stopped"))
