"""Where a batch-1 decode step of the 8B shape spends its GPU time.

    python3 bench/profile_decode.py

1. cuBLAS bandwidth of x[1, K] @ W[N, K]^T for each weight shape of the model.
2. torch.profiler over eager batch-1 decode steps: GPU time per kernel class, per step.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import random_checkpoint  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


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


def classify(name: str) -> str:
    lowered = name.lower()
    for key, label in (("gemv", "gemm"), ("gemm", "gemm"), ("sm90", "gemm"), ("cutlass", "gemm"),
                       ("nvjet", "gemm"), ("decode", "attention"), ("prefill", "attention"),
                       ("rms", "norm"), ("rotary", "rotary"), ("kv_cache", "kv_write"),
                       ("silu", "silu_mul"), ("argmax", "sampling"), ("reduce", "attention")):
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
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            label = classify(event.key)
            totals[label] += event.device_time_total / num_steps
            counts[label] += event.count / num_steps
    return {k: {"us_per_step": round(v, 1), "kernels_per_step": round(counts[k], 1)}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    print(json.dumps({"gemv": gemv_bandwidth()}), flush=True)
    engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16", max_model_len=4096,
                                    num_kv_blocks=4096, enforce_eager=True), checkpoint=random_checkpoint("8b"))
    profile = profile_steps(engine)
    print(json.dumps({"eager_decode_step_profile": profile}, indent=1), flush=True)
    print("total us/step", round(sum(v["us_per_step"] for v in profile.values()), 1))


if __name__ == "__main__":
    main()
