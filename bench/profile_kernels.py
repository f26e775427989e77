"""Where W1's and W3's GPU time goes: kernel time by category, and the GEMMs' and prefill
attention's achieved TFLOP/s, from torch.profiler over bounded windows of the offline runs.

    python3 bench/profile_kernels.py                         # H200: Llama-3-8B shape, dummy weights
    python3 bench/profile_kernels.py --device cpu --size tiny # plumbing check on a CPU
    python3 bench/profile_kernels.py --format Q4_0 --windows W2  # a quantised format's decode step

Windows (each its own profiler session): W1's prefill phase (until every prompt is computed),
W1's decode phase (the next --decode-steps steps), and W3 in steady state (--w3-skip steps
after submission, then --w3-steps steps; the rest of W3 is aborted, so the run stays short);
with --windows W2, one W2 request's decode (--decode-steps steps after its first token).
--format takes bench/quant.py's formats (FP8, GGUF kept packed, "_kv8" for an FP8 KV cache).
Requests and engine settings are bench/engine.py's (budget 8192, 256 sequences, graphs on).
`device_busy_share_of_wall` near bench/engine.py's GPU-busy share says the profiler saw the
kernels inside CUDA-graph replays; if it is far lower, rerun with --enforce-eager.

Categories (by kernel name): gemm (cuBLAS nvjet/sm90/cutlass/gemv, our skinny GEMM), prefill
attention (our Triton `_prefill_kernel`; mixed steps run decode rows through it too), decode
attention (`_decode_split_kernel` + `_decode_reduce_kernel`), norm/rotary/silu/kv_write,
sampling (argmax, softmax, top-k/top-p sort, exponential draws), memcpy/memset, other.
FLOPs are counted from the steps' shapes (StepPlan), not from the profiler: GEMMs 2·m·n·k over
every projection and the LM head's sampled rows; attention 4·heads·head_dim per (query, key)
pair, causal. On the CPU the categories are aten ops (the reference attention's matmuls count as
gemm there): the CPU mode checks the plumbing, not the figures.
Prints one JSON line per window and writes all of them to --json-out ($OUT/profile_kernels.json
when $OUT is set, else bench/results/profile_kernels-<device>-<size>.json).
"""
import argparse
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES, prompts  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.kernels import triton_backend  # noqa: E402
from replica.models.loader import Checkpoint  # noqa: E402
from replica.models.model_config import ModelConfig  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

SIZES = SHAPES | {"tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)}

# first match wins: attention before gemm ("decode" GEMVs do not exist; our kernels are named)
RULES = (("prefill_kernel", "prefill_attention"), ("decode_split", "decode_attention"),
         ("decode_reduce", "decode_attention"), ("memcpy", "memcpy/memset"), ("memset", "memcpy/memset"),
         ("nvjet", "gemm"), ("gemm", "gemm"), ("gemv", "gemm"), ("cutlass", "gemm"), ("sm90_xmma", "gemm"),
         ("skinny_linear", "gemm"), ("split_k_sum", "gemm"), ("splitkreduce", "gemm"),
         ("per_token_quant", "activation_quant"), ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::bmm", "gemm"),
         ("rms", "norm/rotary/silu/kv_write"), ("rotary", "norm/rotary/silu/kv_write"),
         ("kv_cache", "norm/rotary/silu/kv_write"), ("silu", "norm/rotary/silu/kv_write"),
         ("argmax", "sampling"), ("softmax", "sampling"), ("sort", "sampling"), ("exponential", "sampling"),
         ("distribution", "sampling"), ("topk", "sampling"))
CATEGORIES = ("gemm", "prefill_attention", "decode_attention", "norm/rotary/silu/kv_write", "activation_quant",
              "sampling", "memcpy/memset", "other")


def classify(name: str) -> str:
    lowered = name.lower()
    return next((label for key, label in RULES if key in lowered), "other")


class ShapeCounter:
    """Wraps the runner's execute to count each step's FLOPs from its plan."""

    def __init__(self, engine: LLMEngine):
        cfg = engine.model_config
        self.cfg = cfg
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # per token and layer: qkv, o, gate_up, down (2 FLOPs a multiply-add)
        self.gemm_flops_per_token = 2 * cfg.num_layers * (
            cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
        self.reset()
        original = engine.runner.execute

        def execute(plan, *args, **kwargs):
            self.count(plan)
            return original(plan, *args, **kwargs)
        engine.runner.execute = execute

    def reset(self) -> None:
        self.values = defaultdict(float)

    def count(self, plan) -> None:
        cfg, v = self.cfg, self.values
        tokens = sum(e.num_new_tokens for e in plan.scheduled)
        is_decode = all(e.num_new_tokens == 1 for e in plan.scheduled)
        pairs = 0                  # causal (query, key) pairs over the step's rows
        for e in plan.scheduled:
            n, end = e.num_new_tokens, e.seq.num_computed_tokens + e.num_new_tokens
            pairs += n * end - n * (n - 1) // 2
        attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs
        v["steps"] += 1
        v["decode_steps"] += is_decode
        v["tokens"] += tokens
        v["gemm_flops"] += tokens * self.gemm_flops_per_token + 2 * len(plan.samplers) * cfg.hidden_size * cfg.vocab_size
        v["decode_attention_flops" if is_decode else "prefill_attention_flops"] += attn_flops
        # keys read by the decode kernel: every row of a decode-only step, and a mixed step's
        # leading one-token rows (triton_backend.SPLIT_MIXED_DECODES sends them there)
        for e in plan.scheduled:
            if e.num_new_tokens != 1 and not is_decode:
                break
            if is_decode or triton_backend.SPLIT_MIXED_DECODES:
                v["decode_kv_pairs"] += e.seq.num_computed_tokens + 1


def submit(engine: LLMEngine, reqs: list[tuple[list[int], int]], tag: str) -> None:
    for i, (prompt, out_len) in enumerate(reqs):
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))


def window(engine: LLMEngine, counter: ShapeCounter, name: str, is_cuda: bool, stop) -> dict:
    """Steps the engine under the profiler until `stop(step_index)`; returns the window's figures."""
    activities = [torch.profiler.ProfilerActivity.CUDA if is_cuda else torch.profiler.ProfilerActivity.CPU]
    if is_cuda:
        torch.cuda.synchronize()
    counter.reset()
    step = 0
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        while engine.has_unfinished and not stop(step):
            engine.step()
            step += 1
        if is_cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - t0
    times_us = defaultdict(float)
    kernels: dict[str, dict] = defaultdict(dict)
    for event in prof.key_averages():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if is_cuda != on_device:
            continue
        if not is_cuda and not event.key.startswith("aten::"):
            continue
        us = event.device_time_total if is_cuda else event.self_cpu_time_total   # a kernel has no children
        label = classify(event.key)
        times_us[label] += us
        kernels[label][event.key[:100]] = {"ms": round(us / 1e3, 3), "calls": event.count}
    total_ms = sum(times_us.values()) / 1e3
    v = counter.values
    dtype_bytes = torch.empty((), dtype=engine.dtype).element_size()
    cfg = engine.model_config
    out = {"what": name, "steps": int(v["steps"]), "decode_steps": int(v["decode_steps"]),
           "tokens": int(v["tokens"]), "wall_ms": round(wall_s * 1e3, 1),
           "device_time_ms": round(total_ms, 1),
           "device_ms_per_step": round(total_ms / v["steps"], 2) if v["steps"] else None,
           "device_busy_share_of_wall": round(total_ms / (wall_s * 1e3), 3) if wall_s else None,
           "categories": {c: {"ms": round(times_us.get(c, 0.0) / 1e3, 2),
                              "share": round(times_us.get(c, 0.0) / 1e3 / total_ms, 3) if total_ms else 0.0}
                          for c in CATEGORIES}}

    def rate(flops, category):
        ms = times_us.get(category, 0.0) / 1e3
        return round(flops / (ms * 1e-3) / 1e12, 1) if ms else None
    out["gemm_tflop"] = round(v["gemm_flops"] / 1e12, 2)
    out["gemm_tflop_per_s"] = rate(v["gemm_flops"], "gemm")
    out["prefill_attention_tflop"] = round(v["prefill_attention_flops"] / 1e12, 3)
    out["prefill_attention_tflop_per_s"] = rate(v["prefill_attention_flops"], "prefill_attention")
    decode_ms = times_us.get("decode_attention", 0.0) / 1e3
    kv_bytes = v["decode_kv_pairs"] * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    out["decode_attention_kv_tb_per_s"] = round(kv_bytes / (decode_ms * 1e-3) / 1e12, 2) if decode_ms else None
    out["kernels_per_step"] = round(sum(k["calls"] for c in kernels.values() for k in c.values()) / v["steps"], 1) \
        if v["steps"] else None
    out["top_kernels"] = {c: dict(sorted(k.items(), key=lambda kv: -kv[1]["ms"])[:8]) for c, k in kernels.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="8b", choices=sorted(SIZES))
    parser.add_argument("--decode-steps", type=int, default=40, help="W1 decode steps profiled")
    parser.add_argument("--w3-skip", type=int, default=120, help="W3 steps run before profiling")
    parser.add_argument("--w3-steps", type=int, default=120, help="W3 steps profiled")
    parser.add_argument("--scale", type=float, default=1.0, help="request counts x this (CPU: e.g. 0.05)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs (if a profiler misses the kernels inside graph replays)")
    parser.add_argument("--format", help="a weight format of bench/quant.py (CUDA; default: the bf16 dummy)")
    parser.add_argument("--windows", default="W1,W3", help="of W1, W2, W3")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    windows = set(args.windows.split(","))
    is_cuda = args.device == "cuda"
    cfg = dict(SIZES[args.size], max_position_embeddings=8192, architectures=["LlamaForCausalLM"],
               rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1)
    extra = dict(enforce_eager=args.enforce_eager) if is_cuda else dict(num_kv_blocks=4096)
    if args.format:
        from bench.quant_accuracy import build_engine
        engine = build_engine(ModelConfig.from_hf_dict(cfg), args.format, args.device, max_num_seqs=256,
                              token_budget=8192, engine_args=extra)
    else:
        checkpoint = Checkpoint(path=None, format="dummy", config=ModelConfig.from_hf_dict(cfg))
        engine = LLMEngine(EngineConfig(model="bench", device=args.device, dtype="bfloat16" if is_cuda else "float32",
                                        max_num_batched_tokens=8192, max_num_seqs=256, max_model_len=4096, **extra),
                           checkpoint=checkpoint)
    vocab = engine.model_config.vocab_size
    counter = ShapeCounter(engine)
    results = {"device": torch.cuda.get_device_name() if is_cuda else "cpu", "size": args.size,
               "format": args.format or "bf16",
               "date": datetime.date.today().isoformat(), "cuda_graphs": engine.runner.graphs is not None,
               "windows": []}

    def emit(figures):
        results["windows"].append(figures)
        print(json.dumps({k: v for k, v in figures.items() if k != "top_kernels"}), flush=True)

    n = lambda count: max(2, int(count * args.scale))     # noqa: E731
    submit(engine, [(p, 16) for p in prompts(n(32), [512] * n(32), vocab, 9)], "warm")   # compiles, graphs
    while engine.has_unfinished:
        engine.step()

    if "W2" in windows:
        submit(engine, [(prompts(1, [512], vocab, 1)[0], args.decode_steps + 8)], "w2-")
        engine.step()                                   # prefill and the first token
        emit(window(engine, counter, "W2_decode", is_cuda, lambda step: step >= args.decode_steps))
        while engine.has_unfinished:
            engine.step()

    if "W1" in windows:
        submit(engine, [(p, 128) for p in prompts(n(256), [512] * n(256), vocab, 2)], "w1-")
        emit(window(engine, counter, "W1_prefill_phase", is_cuda,
                    lambda step: step > 0 and not engine.scheduler.waiting
                    and all(s.num_uncomputed_tokens <= 2 for s in engine.scheduler.running)))
        emit(window(engine, counter, "W1_decode_phase", is_cuda, lambda step: step >= args.decode_steps))
        while engine.has_unfinished:
            engine.step()
    if "W3" in windows:
        gen = torch.Generator().manual_seed(0)
        num_w3 = n(1000)
        in_lens = torch.randint(64, 1025, (num_w3,), generator=gen).tolist()
        out_lens = torch.randint(16, 513, (num_w3,), generator=gen).tolist()
        submit(engine, list(zip(prompts(num_w3, in_lens, vocab, 3), out_lens)), "w3-")
        for _ in range(args.w3_skip):
            if engine.has_unfinished:
                engine.step()
        emit(window(engine, counter, "W3_steady", is_cuda, lambda step: step >= args.w3_steps))
        for request_id in list(engine.requests):
            engine.abort_request(request_id)
        while engine.has_unfinished:
            engine.step()

    path = args.json_out or (Path(os.environ["OUT"]) / "profile_kernels.json" if os.environ.get("OUT") else
                             Path(__file__).parent / "results" / f"profile_kernels-{args.device}-{args.size}.json")
    Path(path).write_text(json.dumps(results, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
