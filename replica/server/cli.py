"""`replica serve`: load a model, serve the OpenAI and Ollama APIs, drain on SIGTERM.

  replica serve                                   # bundled SmolLM2 on 127.0.0.1:8000
  replica serve --model ./Qwen2.5-0.5B-Instruct --host 0.0.0.0 --port 8001 --device cuda
  replica serve --served-model-name chat --api-key "$KEY" --drain-timeout 60
  PAGEFLEET_API_KEYS=k1,k2 replica serve          # keys from the environment

SIGTERM/SIGINT: /ready turns 503 and new work gets 503, requests in flight run on for up to
--drain-timeout seconds, then those left are aborted (their streams end with finish_reason
"abort"), the engine core stops and the process exits; idle, within a fraction of a second.
A second SIGTERM/SIGINT ends the drain at once.

Exit codes: 0 after a drain (SIGTERM/SIGINT), 2 for invalid settings, 1 when the port cannot
be bound, the model cannot be loaded, or the engine core process died while serving.
"""
import argparse
import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from replica.server.config import ServerConfig

log = logging.getLogger("replica.server")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="replica serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="checkpoint folder, .gguf file, 'smollm2' (the bundled GGUF), or a model "
                        "of Ollama's store by its Ollama name (llama3.2:3b; OLLAMA_MODELS)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PAGEFLEET_PORT") or 8000),
                   help="port to listen on (default: $PAGEFLEET_PORT, else 8000; the image's "
                        "HEALTHCHECK reads the same variable)")
    p.add_argument("--served-model-name", help="the name clients send in `model` "
                   "(default: derived from --model)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this bearer key (repeatable; also PAGEFLEET_API_KEYS=k1,k2); "
                        "none: no authentication")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="seconds SIGTERM waits for requests in flight before aborting them "
                        "(default 30; keep it under the stop grace period of Docker or Swarm)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's, "
                   "capped at 8192)")
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (prefill chunk size)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="this replica's share of GPU memory for its weights, activations and KV cache "
                        "(0.2 each lets four replicas share one GPU)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompts that start alike (default on)")
    p.add_argument("--enable-overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="plan step t+1 while the device runs step t (default on)")
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="Triton kernels or the torch reference for every op (default: triton on CUDA)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of requests that bring none (default 0)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False, help="no CUDA graphs")
    p.add_argument("--cuda-graph-max-tokens", type=int, default=2048, metavar="N",
                   help="steps with prefill chunks of up to N tokens replay piecewise CUDA graphs "
                        "(graphs between attentions, attention eager); 0: they run eagerly")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json (benchmarks; no weight files needed)")
    p.add_argument("--quantization", choices=["fp8", "gguf"],
                   help="fp8: W8A8 FP8 on Ada/Hopper (bf16 weights quantised on load; FP8 "
                        "checkpoints need no flag); gguf: keep a GGUF's Q4/Q5/Q6_K/Q8_0 "
                        "weights quantised on the GPU (default: GGUF dequantised on load)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: keep keys and values in FP8 e4m3 (half the bytes a token, so twice "
                        "the tokens in the same memory; Ada/Hopper or CPU); default: the model dtype")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="waiting requests before new ones get 503 + Retry-After (default 1024)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (samples per request)")
    p.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral"],
                   help="how the model writes tool calls (default: picked from its chat template)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _configs(args: argparse.Namespace):
    from replica.config import EngineConfig

    env_keys = [k.strip() for k in os.environ.get("PAGEFLEET_API_KEYS", "").split(",")]
    server = ServerConfig(
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        api_keys=tuple(args.api_key) + tuple(k for k in env_keys if k),
        drain_timeout_s=args.drain_timeout, max_body_bytes=args.max_body_bytes,
        max_n=args.max_n, log_level=args.log_level, tool_call_parser=args.tool_call_parser)
    if args.max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {args.max_queue}")
    engine = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens,
        load_format=args.load_format, max_num_waiting=args.max_queue,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_overlap=args.enable_overlap, kernel_backend=args.kernel_backend,
        block_size=args.block_size, seed=args.seed)
    return server, engine


# After the drain (or its timeout) the aborted requests' handlers write their last event; this
# bounds that wait, so that a stop takes at most drain_timeout_s plus about a second.
ABORT_GRACE_S = 1.0


async def serve(engine, config: ServerConfig) -> int:
    """Serves until SIGTERM/SIGINT, then drains: refuse new work, let requests in flight end
    (up to the drain timeout, or until a second signal), abort the rest (their streams end with
    finish_reason "abort"), stop the engine core, stop."""
    from replica.server.app import build_app
    from replica.server.serving import REPLICA

    app = build_app(engine, config)
    lifecycle = app[REPLICA].lifecycle
    engine.on_core_death = lambda: lifecycle.fail("the engine core process died")
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its request.
    # shutdown_timeout: what a handler still running after the drain and its abort gets.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.25)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as err:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, err.strerror)
        await runner.cleanup()
        return 1
    lifecycle.install_signal_handlers(asyncio.get_running_loop())
    log.info("serving %s on http://%s:%d", app[REPLICA].served_model_name, config.host, config.port)
    await lifecycle.wait_for_stop()
    if not await lifecycle.drain(config.drain_timeout_s):
        num_aborted = engine.abort_all()
        log.warning("drain ended with %d request(s) in flight: %d aborted",
                    lifecycle.num_in_flight, num_aborted)
        await lifecycle.drain(ABORT_GRACE_S, can_be_cut=False)
    await runner.cleanup()
    log.info("stopped")
    return lifecycle.exit_code


def _has_nvidia_gpu() -> bool:
    """What `--device auto` will find, told without importing torch: the NVIDIA driver's device."""
    return os.path.exists("/dev/nvidiactl")


def exit_now(code: int) -> None:
    """Ends the process once serving is over, without finalising the interpreter: with torch
    and transformers imported that took 1-3 s on 2 CPU cores (module teardown and the last
    garbage collection), which a stopping replica spent after its work was done. By then the
    engine core has exited, the sockets are closed and the logs are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_while_loading(signum, frame) -> None:
    raise SystemExit(0)         # unwinds to `main`, which ends the core process and exits


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Until the event loop owns the signals, SIGTERM or SIGINT during loading ends the process
    # (nothing is in flight to drain).
    signal.signal(signal.SIGTERM, _stop_while_loading)
    signal.signal(signal.SIGINT, _stop_while_loading)
    from replica.engine.core_launch import CoreLaunch
    # the core process first: its imports run beside this process's (it dies with this one)
    launch = CoreLaunch(is_omp_passive=args.device == "cpu" or (args.device == "auto" and not _has_nvidia_gpu()))
    try:
        try:
            server_config, engine_config = _configs(args)
        except ValueError as err:
            return _refuse(launch, err, 2)
        from replica.engine.async_engine import AsyncEngine
        try:
            engine = AsyncEngine(engine_config, launch)      # the core loads the model; waits for it
        except (ValueError, RuntimeError) as err:
            return _refuse(launch, err, 1)
        code = asyncio.run(serve(engine, server_config))
    except SystemExit:          # a signal before the event loop's handlers took over
        launch.kill()
        log.info("stopped before serving")
        code = 0
    exit_now(code)
    return code                 # not reached


def _refuse(launch, err: Exception, code: int) -> int:
    launch.kill()
    print(f"replica serve: {err}", file=sys.stderr)
    return code
