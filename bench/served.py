"""The served path against the engine offline, on one GPU, in one run (issue 11's benchmark).

    python3 bench/served.py                      # 8B shape, random bf16 weights (about 6 minutes on an H200)
    python3 bench/served.py --size 1b --num-requests 200     # quick
    python3 bench/served.py --device cpu --size tiny --num-requests 40   # the same flow on a CPU
    python3 bench/served.py --skip-offline --http W4 --serve-arg=--cuda-graph-max-tokens=0  # an A/B

1. Offline, `LLMEngine` in this process: W1, W2, W5 and KV waste (bench/engine.py's runs), then W3
   with the load generator's own 1000 requests all at once, after a warm-up pass over 1000 other
   requests of the same distribution (`W3_offline_cold`: it pays for Triton compilation; other
   prompts, so the measured pass gets no prefix-cache hits from it); GPU-busy share from CUDA
   events around each step's GPU work, host time per step = (wall - GPU busy) / steps.
2. W3 over HTTP: `replica serve` (engine core in its own process) on the same random weights and
   settings, the same 1000 requests all at once, streaming, through the project's load generator
   (after a warm-up pass of the same requests).
3. W4: the same requests at concurrency 128 against `replica serve` with its default token budget
   (2048: shorter mixed steps, so a running stream waits less behind others' prefills).
The replica's own generation-token counter over each HTTP run is reported beside the load
generator's figure: when they agree, the load generator was not the bottleneck.
Writes bench/results/served-<gpu>-<size>-<date>.json and .png (or into $OUT).
"""
import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine as engine_bench  # noqa: E402  (bench/engine.py)
from fleetctl.loadgen import BenchConfig, make_requests, run_benchmark  # noqa: E402
from fleetctl.loadgen_report import summarize  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

# the shapes of bench/engine.py, plus one small enough for a CPU
SHAPES = engine_bench.SHAPES | {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
}
RESULTS = engine_bench.RESULTS       # one table of results for both scripts' workloads
emit = engine_bench.emit


def model_folder(size: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"served-{size}-"))
    config = SHAPES[size] | {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                             "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def engine_settings(args) -> dict:
    return dict(max_model_len=4096, max_num_batched_tokens=args.token_budget, max_num_seqs=256)


def offline_w3(args, folder: Path, requests, warmup_requests) -> None:
    engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", device=args.device,
                                    dtype=args.dtype, **engine_settings(args)))
    is_cuda = engine.device.type == "cuda"

    def run(reqs) -> dict:
        engine.runner.step_events = events = [] if is_cuda else None
        if is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, spec in enumerate(reqs):
            engine.add_request(str(i), list(spec.prompt_token_ids),
                               SamplingParams(temperature=0.0, max_tokens=spec.num_output_tokens, ignore_eos=True))
        num_out = num_steps = 0
        while engine.has_unfinished:
            num_steps += 1
            for out in engine.step():
                num_out += sum(len(c.new_token_ids) for c in out.outputs)
        if is_cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - t0
        gpu_s = sum(s.elapsed_time(e) for s, e in events) / 1e3 if is_cuda else float("nan")
        engine.runner.step_events = None
        return dict(req_per_s=round(len(reqs) / wall_s, 2), out_tok_per_s=round(num_out / wall_s, 1),
                    wall_s=round(wall_s, 2), steps=num_steps, gpu_busy_share=round(gpu_s / wall_s, 3),
                    host_ms_per_step=round((wall_s - gpu_s) / num_steps * 1e3, 3))

    if args.with_engine_workloads and is_cuda:
        bench_engine_workloads(engine, args.size)
    # Warm-up on other prompts of the same distribution: a second pass over the same prompts
    # would hit the prefix cache (measured: 52 instead of 32 requests/s).
    emit("W3_offline_cold", **run(warmup_requests))
    emit("W3_offline", **run(requests))


def bench_engine_workloads(engine: LLMEngine, size: str) -> None:
    """W2, W1, W5 and the W3 KV waste as bench/engine.py measures them, on this engine."""
    vocab = engine.model_config.vocab_size
    prompts, run = engine_bench.prompts, engine_bench.run
    run(engine, [(p, 16) for p in prompts(32, [512] * 32, vocab, 9)])
    w2 = run(engine, [(prompts(1, [512], vocab, 1)[0], 128)])
    emit("W2", ttft_ms=round(w2["ttft_first_s"] * 1e3, 1),
         decode_tok_per_s=round(127 / (w2["last"]["0"] - w2["first"]["0"]), 1),
         gpu_busy_share=round(w2["gpu_busy_share"], 3),
         host_ms_per_step=round(w2["wall_s"] * (1 - w2["gpu_busy_share"]) / w2["steps"] * 1e3, 3))
    emit("W2_graph_replay_only", **engine_bench.graph_replay_time(engine, size))
    w1 = run(engine, [(p, 128) for p in prompts(256, [512] * 256, vocab, 2)])
    emit("W1", req_per_s=round(256 / w1["wall_s"], 2), out_tok_per_s=round(w1["num_out"] / w1["wall_s"], 1),
         gpu_busy_share=round(w1["gpu_busy_share"], 3),
         host_ms_per_step=round(w1["wall_s"] * (1 - w1["gpu_busy_share"]) / w1["steps"] * 1e3, 3))
    figures = engine_bench.w5_req_per_s(engine, vocab)
    emit("W5", req_per_s_cached=round(figures[True], 2), req_per_s_uncached=round(figures[False], 2),
         speedup=round(figures[True] / figures[False], 2))
    gen = torch.Generator().manual_seed(0)
    in_lens = torch.randint(64, 1025, (1000,), generator=gen).tolist()
    out_lens = torch.randint(16, 513, (1000,), generator=gen).tolist()
    w3 = run(engine, list(zip(prompts(1000, in_lens, vocab, 3), out_lens)), track_waste=True)
    emit("KV_waste", at_w3_admission_end=round(w3["kv_waste"] or 0.0, 4))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generation_tokens(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    match = re.search(r"^pagefleet_generation_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def start_server(args, folder: Path, log_path: Path, token_budget: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    settings = engine_settings(args) | {"max_num_batched_tokens": token_budget}
    cmd = [sys.executable, "-m", "replica.cli", "serve", "--model", str(folder), "--load-format", "dummy",
           "--served-model-name", "bench", "--port", str(port), "--device", args.device,
           "--dtype", args.dtype, "--max-model-len", str(settings["max_model_len"]),
           "--max-num-batched-tokens", str(settings["max_num_batched_tokens"]),
           "--max-num-seqs", str(settings["max_num_seqs"]), "--max-queue", "100000",
           "--log-level", "warning", *args.serve_arg]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(url + "/ready", timeout=2).status == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("replica serve was not ready in 600 s")


def http_run(name: str, url: str, requests, concurrency: int | None) -> None:
    config = BenchConfig(url, "bench", concurrency=concurrency, timeout_s=1800)
    before = generation_tokens(url)
    run = asyncio.run(run_benchmark(config, requests))
    replica_tokens = generation_tokens(url) - before
    s = summarize(run)
    emit(name, req_per_s=round(s["requests_per_s"], 2), out_tok_per_s=round(s["output_tokens_per_s"], 1),
         replica_out_tok_per_s=round(replica_tokens / run.duration_s, 1), num_errors=s["num_errors"],
         ttft_ms_p50=round(s["ttft_ms"]["p50"], 1), ttft_ms_p99=round(s["ttft_ms"]["p99"], 1),
         itl_ms_p50=round(s["itl_ms"]["p50"], 2), itl_ms_p99=round(s["itl_ms"]["p99"], 2),
         wall_s=round(run.duration_s, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--serve-token-budget", type=int, default=2048,
                        help="token budget of the replica W4 runs against (replica serve's default)")
    parser.add_argument("--no-engine-workloads", dest="with_engine_workloads", action="store_false",
                        help="skip W1, W2, W5 (the offline engine's own workloads)")
    parser.add_argument("--http", default="W3,W4", help="the HTTP runs: W3, W4 or both")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an extra argument of replica serve, e.g. --serve-arg=--cuda-graph-max-tokens=0")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    is_cuda = args.device.startswith("cuda")
    emit("env", gpu=torch.cuda.get_device_name() if is_cuda else platform.processor() or "cpu",
         torch=torch.__version__, python=platform.python_version(), date=datetime.date.today().isoformat(),
         size=args.size, num_requests=args.num_requests, token_budget=args.token_budget,
         serve_token_budget=args.serve_token_budget, serve_args=args.serve_arg, commit=git_commit())
    folder = model_folder(args.size)
    requests = make_requests(args.num_requests, (64, 1024), (16, 512), vocab_size=SHAPES[args.size]["vocab_size"],
                             seed=0)
    warmup_requests = make_requests(args.num_requests, (64, 1024), (16, 512),
                                    vocab_size=SHAPES[args.size]["vocab_size"], seed=1)
    if args.size == "tiny":        # 4096 positions of context are more than a CPU wants to fill
        requests = make_requests(args.num_requests, (8, 64), (4, 32), vocab_size=512, seed=0)
        warmup_requests = make_requests(args.num_requests, (8, 64), (4, 32), vocab_size=512, seed=1)
    if not args.skip_offline:
        offline_w3(args, folder, requests, warmup_requests)
        gc.collect()                       # the offline engine's GPU memory goes back before serving
        if is_cuda:
            torch.cuda.empty_cache()
    http = {"W3": (args.token_budget, [("W3_http_cold", None, warmup_requests), ("W3_http", None, requests)]),
            "W4": (args.serve_token_budget, [("warmup_w4", 128, warmup_requests), ("W4_http_c128", 128, requests)])}
    for budget, runs in (http[name] for name in args.http.split(",")):
        proc, url = start_server(args, folder, folder / f"serve-{budget}.log", budget)
        try:
            for name, concurrency, reqs in runs:
                http_run(name, url, reqs, concurrency)
        finally:
            proc.terminate()
            proc.wait(60)
    if "W3_offline" in RESULTS and "W3_http" in RESULTS:
        ratio = RESULTS["W3_http"]["req_per_s"] / RESULTS["W3_offline"]["req_per_s"]
        emit("W3_http_over_offline", ratio=round(ratio, 3), target=0.95)
    print(f"\n{'figure':<28}{'value':>12}")
    for key, field in [("W1", "req_per_s"), ("W1", "gpu_busy_share"), ("W2", "decode_tok_per_s"),
                       ("W2_graph_replay_only", "tok_per_s"), ("W5", "speedup"), ("KV_waste", "at_w3_admission_end"),
                       ("W3_offline", "req_per_s"), ("W3_offline", "gpu_busy_share"),
                       ("W3_offline", "host_ms_per_step"), ("W3_http", "req_per_s"),
                       ("W3_http", "replica_out_tok_per_s"), ("W3_http", "out_tok_per_s"),
                       ("W3_http_over_offline", "ratio"), ("W4_http_c128", "req_per_s"),
                       ("W4_http_c128", "itl_ms_p50"), ("W4_http_c128", "itl_ms_p99"),
                       ("W4_http_c128", "ttft_ms_p99")]:
        print(f"{key + ' ' + field:<40}{RESULTS.get(key, {}).get(field, '')!s:>12}")
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = RESULTS["env"]["gpu"].replace(" ", "-")
    path = out / f"served-{gpu}-{args.size}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(RESULTS, indent=2))
    print(f"wrote {path}")
    if plot(RESULTS, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")


def plot(results: dict, path: Path) -> bool:
    """Offline against served (W3 req/s), and W4's latency percentiles."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if "W3_http" not in results:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = ["W3 offline", "W3 over HTTP", "W4 at 128"]
    values = [results.get("W3_offline", {}).get("req_per_s", 0), results["W3_http"]["req_per_s"],
              results.get("W4_http_c128", {}).get("req_per_s", 0)]
    bars = axes[0].bar(labels, values, color=["#999999", "#2a6fdb", "#2a6fdb"])
    axes[0].bar_label(bars, fmt="%.1f")
    axes[0].set_title("requests/s")
    w4 = results.get("W4_http_c128", {})
    names = ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
    vals = [w4.get("ttft_ms_p50", 0), w4.get("ttft_ms_p99", 0), w4.get("itl_ms_p50", 0), w4.get("itl_ms_p99", 0)]
    bars = axes[1].bar(names, vals, color="#2a6fdb")
    axes[1].bar_label(bars, fmt="%.1f")
    axes[1].set_yscale("log")
    axes[1].set_title("W4 at concurrency 128, ms")
    env = results.get("env", {})
    fig.suptitle(f"{env.get('gpu', '')}, {env.get('size', '')} shape, {env.get('date', '')}: served vs offline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    main()
