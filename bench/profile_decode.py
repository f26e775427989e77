"""Where a batch-1 decode step of the 8B shape spends its GPU time.

    python3 bench/profile_decode.py                  # --gemv --profile
    python3 bench/profile_decode.py --sweep --json-out sweep.json
    python3 bench/profile_decode.py --profile --w2

--gemv     cuBLAS bandwidth of x[1, K] @ W[N, K]^T for each weight shape of the model (eager).
--sweep    the Triton skinny GEMM's tile configurations against cuBLAS, per weight shape and
           rows of x, timed as the engine runs them: captured in a CUDA graph, weights rotated
           so that every call reads cold memory (> 2x L2 between two reads of one copy).
--profile  torch.profiler over eager batch-1 decode steps: GPU time per kernel class, per step,
           and the kernel names in each class.
--w2       W2 alone (512-token prompt, 128 new tokens, batch 1) through CUDA graphs, as
           bench/engine.py measures it: decode tokens/s and the graph replay time, twice.
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import graph_replay_time, prompts, random_checkpoint, run  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
L2_BYTES = 50 * 2 ** 20


def gemv_bandwidth() -> dict:
    out = {}
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]  # beat L2
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for w in weights:
            F.linear(x, w)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(40):
            F.linear(x, weights[i % 4])
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) / 40 * 1e3
        out[name] = {"us": round(us, 1), "TBps": round(n * k * 2 / (us * 1e-6) / 1e12, 2)}
        del weights
    return out


def _graph_us_per_call(calls) -> float:
    """Median over 10 replays of one CUDA graph holding every call, per call."""
    for call in calls:                      # compile, pick cuBLAS kernels, outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def _sweep_configs(num_rows: int, n: int):
    from replica.kernels.linear_triton import LinearConfig as C
    if num_rows == 1:
        base = [C(1, 4096), C(2, 2048), C(4, 1024), C(4, 2048, num_warps=8), C(8, 512),
                C(8, 1024, num_warps=8), C(4, 2048), C(8, 1024), C(16, 512), C(32, 256),
                C(16, 1024, num_warps=8), C(4, 1024, num_stages=3), C(8, 512, num_stages=3)]
        if n > 8192:
            return base
        return base + [C(c.block_n, c.block_k, split_k) for split_k in (2, 4)
                       for c in (C(4, 1024), C(8, 512), C(8, 1024))]
    base = [C(64, 128, num_stages=4), C(64, 256, num_stages=3), C(32, 256, num_stages=3),
            C(16, 512, num_stages=3), C(128, 128, num_stages=4), C(32, 128, num_stages=4)]
    if n <= 8192:
        base += [C(c.block_n, c.block_k, 4, c.num_warps, c.num_stages) for c in base[:4]]
    return base


def gemv_sweep(swept_rows=(1, 4), timed_rows=(1, 2, 4, 8)) -> list[dict]:
    """Every config at `swept_rows` rows of x; the default config alone at the other rows."""
    from replica.kernels.linear_triton import choose_config, skinny_linear
    records = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, -(-2 * L2_BYTES // nbytes) + 1)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
                   for _ in range(copies)]
        num_calls = copies * -(-8 // copies)
        for num_rows in timed_rows:
            x = torch.randn(num_rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float())
            cublas = _graph_us_per_call([lambda w=weights[i % copies]: F.linear(x, w)
                                         for i in range(num_calls)])
            row = {"shape": name, "n": n, "k": k, "rows": num_rows, "cublas_us": round(cublas, 2),
                   "cublas_TBps": round(nbytes / cublas / 1e6, 3), "configs": []}
            configs = [None] + (_sweep_configs(num_rows, n) if num_rows in swept_rows else [])
            for config in configs:
                label = "default" if config is None else (
                    f"bn{config.block_n}_bk{config.block_k}_s{config.split_k}"
                    f"_w{config.num_warps}_st{config.num_stages}")
                try:
                    out = skinny_linear(x, weights[0], config=config)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    us = _graph_us_per_call([lambda w=weights[i % copies]: skinny_linear(x, w, config=config)
                                             for i in range(num_calls)])
                except Exception as exc:   # a tile that does not compile is a sweep result too
                    row["configs"].append({"config": label, "error": repr(exc)[:200]})
                    continue
                row["configs"].append({"config": label, "us": round(us, 2),
                                       "TBps": round(nbytes / us / 1e6, 3), "rel_err": round(err, 5)})
            row["default"] = repr(choose_config(num_rows, n, k, x.device))
            ok = [c for c in row["configs"] if "us" in c]
            best = min(ok, key=lambda c: c["us"]) if ok else {}
            print(f"{name:>8} M={num_rows} cuBLAS {cublas:7.1f} us {row['cublas_TBps']:.2f} TB/s | "
                  f"default {ok[0]['us'] if ok else float('nan'):7.1f} us | best {best.get('config')} "
                  f"{best.get('us', float('nan')):7.1f} us {best.get('TBps', 0):.2f} TB/s", flush=True)
            records.append(row)
        del weights
        torch.cuda.empty_cache()
    return records


def classify(name: str) -> str:
    lowered = name.lower()
    for key, label in (("gemv", "gemm"), ("gemm", "gemm"), ("sm90", "gemm"), ("cutlass", "gemm"),
                       ("nvjet", "gemm"), ("skinny_linear", "gemm"), ("split_k_sum", "gemm"),
                       ("splitkreduce", "gemm"), ("decode", "attention"), ("prefill", "attention"),
                       ("rms", "norm"), ("rotary_kv", "rotary+kv_write"), ("rotary", "rotary"),
                       ("kv_cache", "kv_write"), ("silu", "silu_mul"), ("argmax", "sampling"),
                       ("reduce", "attention")):
        if key in lowered:
            return label
    return "other:" + name[:60]


def profile_steps(engine: LLMEngine, num_steps: int = 20) -> dict:
    engine.add_request("p", list(range(100, 612)), SamplingParams(temperature=0.0, max_tokens=200,
                                                                   ignore_eos=True))
    engine.step()                                 # prefill
    for _ in range(5):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort_request("p")
    engine.step()
    totals = defaultdict(float)
    counts = defaultdict(int)
    names = defaultdict(dict)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            label = classify(event.key)
            totals[label] += event.device_time_total / num_steps
            counts[label] += event.count / num_steps
            names[label][event.key[:90]] = [round(event.device_time_total / num_steps, 1),
                                            round(event.count / num_steps, 1)]
    return {k: {"us_per_step": round(v, 1), "kernels_per_step": round(counts[k], 1),
                "kernels": names[k]}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def w2_decode(num_runs: int = 2) -> list[dict]:
    """W2 as bench/engine.py runs it (same prompt, graphs, max_model_len 4096), fewer buckets."""
    engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16", max_model_len=4096,
                                    num_kv_blocks=4096, max_num_seqs=8, max_num_batched_tokens=8192),
                       checkpoint=random_checkpoint("8b"))
    vocab = engine.model_config.vocab_size
    run(engine, [(p, 16) for p in prompts(8, [512] * 8, vocab, 9)])            # warm-up
    results = []
    for _ in range(num_runs):
        w2 = run(engine, [(prompts(1, [512], vocab, 1)[0], 128)])
        results.append({"decode_tok_per_s": round(127 / (w2["last"]["0"] - w2["first"]["0"]), 1),
                        "gpu_busy_share": round(w2["gpu_busy_share"], 3),
                        "graph_replay": graph_replay_time(engine, "8b")})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemv", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--w2", action="store_true")
    parser.add_argument("--json-out", help="also write every figure to this JSON file")
    args = parser.parse_args()
    if not (args.gemv or args.sweep or args.profile or args.w2):
        args.gemv = args.profile = True
    results = {"gpu": torch.cuda.get_device_name()}
    if args.gemv:
        results["gemv"] = gemv_bandwidth()
        print(json.dumps({"gemv": results["gemv"]}), flush=True)
    if args.sweep:
        results["sweep"] = gemv_sweep()
    if args.profile:
        engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16", max_model_len=4096,
                                        num_kv_blocks=4096, enforce_eager=True),
                           checkpoint=random_checkpoint("8b"))
        profile = profile_steps(engine)
        results["eager_decode_step_profile"] = profile
        print(json.dumps({"eager_decode_step_profile": profile}, indent=1), flush=True)
        print("total us/step", round(sum(v["us_per_step"] for v in profile.values()), 1), flush=True)
        del engine
    if args.w2:
        results["w2"] = w2_decode()
        print(json.dumps({"w2": results["w2"]}), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
