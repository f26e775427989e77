"""The engine core's own process: `python -m replica.engine.core_proc INPUT_ADDR OUTPUT_ADDR`.

Started by `AsyncEngine` (the server process), which binds both sockets. The loop:

    receive every waiting CoreInputs (adds, stops) ─▶ step ─▶ send one CoreOutputs ─▶ repeat
    (idle: block on the input socket, waking every second to check the parent)

Invariants:
- The core never outlives the server: the kernel kills it when its parent dies (PR_SET_PDEATHSIG),
  and the idle loop also checks that its parent is still the one that started it.
- SIGINT and SIGTERM are the server's: a Ctrl-C on the terminal, or a signal to the process group,
  must not kill the core under a draining server. The core ends on `shutdown` or with its parent.
- A request the core refuses (ValueError) is answered with a RequestError, never a crash; any
  other exception ends the process non-zero, which the server sees at once.
- Once the loop has ended and the last output is delivered, the process leaves with `os._exit`:
  freeing the model and finalising an interpreter that holds torch (module teardown, the last
  garbage collection) took 1.5-2.5 s on 2 CPU cores, and a stopping replica waits for it.
  Nothing is left to flush by then: the sockets are closed and the logs flushed first.
"""
import ctypes
import logging
import os
import signal
import sys

import msgspec
import zmq

from replica.engine.messages import (CoreFailed, CoreInputs, CoreOutputs, CoreReady, CoreStart, EmbedResult,
                                     RequestError)

log = logging.getLogger("replica.engine.core")

_PR_SET_PDEATHSIG = 1
_PARENT_CHECK_MS = 1000


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):      # not Linux: the idle loop's parent check remains
        pass


class LoadFailed(Exception):
    """The model did not load; the server has its CoreFailed. exit_code: 2 for settings, else 1."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


def main(argv: list[str]) -> None:
    """Runs the core, then ends the process (never returns)."""
    input_addr, output_addr = argv
    parent_pid = os.getppid()
    die_with_parent()
    if os.getppid() != parent_pid:          # the parent died before prctl took effect
        exit_now(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("PAGEFLEET_CORE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    inputs.connect(input_addr)
    outputs = ctx.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)
    outputs.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    core = None
    try:
        core = load(inputs, outputs, encoder)
        exit_code = run(core, inputs, outputs, encoder, parent_pid)
    except LoadFailed as failed:
        exit_code = failed.exit_code
    except Exception:
        log.exception("the engine core died")
        exit_code = 1
    finally:
        outputs.close(linger=1000)
        inputs.close(linger=0)
        ctx.term()          # returns once the last output is sent (or after the linger)
    # `core` is still referenced here: freeing the model and the KV cache one tensor at a time
    # (0.2 s and more) is work that the exit makes moot
    exit_now(exit_code)


def load(inputs, outputs, encoder):
    """The EngineCore of the server's `CoreStart`, announced with CoreReady; LoadFailed after
    a CoreFailed."""
    # torch and the model code first: `replica serve` starts this process before its own imports
    # (`core_launch.py`), so the two import at once while the server gets to its `CoreStart`
    from replica.engine.core import EngineCore
    start = msgspec.msgpack.decode(inputs.recv(), type=CoreStart)
    try:
        core = EngineCore(start.config)
    except ValueError as err:
        outputs.send(encoder.encode(CoreFailed(str(err), True)))
        raise LoadFailed(2) from None
    except Exception as err:
        log.exception("the engine core failed to load")
        outputs.send(encoder.encode(CoreFailed(f"{type(err).__name__}: {err}", False)))
        raise LoadFailed(1) from None
    outputs.send(encoder.encode(CoreReady(core.max_model_len, core.block_manager.num_blocks,
                                          str(core.device), str(core.dtype), core.load_s, core.stats(),
                                          core.model.num_weight_bytes, core.model.quantization,
                                          str(core.kv_dtype).removeprefix("torch."))))
    return core


def run(core, inputs, outputs, encoder, parent_pid: int) -> int:
    decoder = msgspec.msgpack.Decoder(CoreInputs)
    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    last_stats = None
    while True:
        is_busy = core.has_unfinished
        if not is_busy and not poller.poll(_PARENT_CHECK_MS):
            if os.getppid() != parent_pid:
                return 0
            continue
        errors: list[RequestError] = []
        embeddings: list[EmbedResult] = []
        while True:
            try:
                frame = inputs.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message = decoder.decode(frame.buffer)
            if message.shutdown:
                return 0
            for add in message.adds:
                try:
                    core.add_request(add.request_id, add.prompt_token_ids, add.params, add.arrival_s)
                except ValueError as err:
                    errors.append(RequestError(add.request_id, str(err)))
            for stop in message.stops:
                core.stop_seq(stop.request_id, stop.index, stop.reason)
            for call in message.embeds:       # between steps: never shares the device with one
                try:
                    embeddings.append(EmbedResult(call.call_id, core.embed(call.token_lists, call.pooling), None))
                except ValueError as err:
                    embeddings.append(EmbedResult(call.call_id, None, str(err)))
        step_outputs = core.step() if core.has_unfinished else []
        stats = core.stats()
        if step_outputs or errors or embeddings or stats != last_stats:
            outputs.send(encoder.encode(CoreOutputs(step_outputs, stats, errors, embeddings)), copy=False)
            last_stats = stats


def exit_now(code: int) -> None:
    """Ends the process without finalising the interpreter (see the module's invariants)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
