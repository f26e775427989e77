"""Accuracy of the quantised formats on random weights, measured so that it can find a bug.

The first GPU run of bench/quant.py compared each format's logits with bf16's on the original
dummy weights and found them uncorrelated (top-1 agreement 9 % for FP8, < 1 % for Q4_K/Q4_0).
The weights were the same (same seeded stream, quantised on the way). The cause is the model,
not the path: dummy Llama weights ~ N(0, 0.02) at width 4096 make a chaotic network (each
projection has gain 0.02·√4096 ≈ 1.3, every layer adds more than the residual holds), so
a small change of the weights grows layer by layer. On the CPU, with the torch reference paths
only: 1 % relative weight noise → logits rel. error 0.07 after 4 layers at 8B width; Q4_K (≈ 8 %
per weight) → 0.50 and top-1 agreement 0/4, with the packed path equal to bf16 running the
dequantised weights bit for bit. So "vs original bf16" measures this random model's
sensitivity, not the implementation.

What finds bugs is the comparison against bf16 running the SAME effective weights:

    GGUF   bf16 engine loaded with the dequantised blocks (what the packed kernels must compute),
           output head included (Q6_K, as in llama.cpp's files)
    FP8    bf16 engine loaded with w_q · w_scale (W8A8 still quantises activations per token)

for the first step (prefill: GGUF dequantise + cuBLAS, FP8 _scaled_mm) and the first decode
step (GGUF GEMV, FP8 weight-only GEMV, inside CUDA graphs on the GPU), rows whose first token
agreed. `noise_floor` reports bf16 against bf16 with 1 % weight noise: the scale of the chaos.

Measured on an H200 at the 8B shapes, 32 layers (bench/results/quant-issue15b-H200-8b-2026-11-28.json):
1 % weight noise → logits rel. error 0.21 and top-1 agreement 0.5. GGUF Q4_K/Q4_0 against bf16
on their dequantised weights: prefill 0.0 (bit for bit), decode 0.03-0.06 (GEMV vs bf16 GEMV
rounding, amplified): no bug. FP8 against bf16 on w_q · w_scale: 0.50-0.53, which the per-token
activation rounding (≈ 3.6 % an element at every projection input, against 1 % weight noise
giving 0.21) explains; `vs_torch_w8a8` (added after that run) compares the GPU path with the torch
W8A8 reference directly.
"""
import gc

import torch

from replica.config import EngineConfig
from replica.engine.engine import LLMEngine
from replica.kernels.fp8_linear import quantize_rows_ref
from replica.models.loader import InMemoryCheckpoint, _dummy_weights
from replica.models.model_config import ModelConfig
from replica.quantization.gguf_packed import GGUFTensor, dequantize_packed, pack
from replica.quantization.gguf_quantize import llama_cpp_mix, quantize
from replica.sampling_params import SamplingParams

# GGUF formats as llama.cpp writes the files (`gguf_quantize.llama_cpp_mix`): the output head in
# Q6_K; "Q4_K_M" (Ollama's default) and "Q5_K_M" also keep attn_v and ffn_down in Q6_K in half the
# layers; "Q4_K" and "Q4_0" quantise every projection to that one type.
GGUF_FORMATS = ("Q4_K_M", "Q5_K_M", "Q4_K", "Q4_0", "Q8_0")


def gguf_type(fmt: str, name: str, num_layers: int) -> str | None:
    """The GGML type format `fmt` gives the tensor `name` (HF), or None where it stays float."""
    if fmt not in GGUF_FORMATS or not (name.endswith("proj.weight") or name == "lm_head.weight"):
        return None
    return llama_cpp_mix(fmt, name, num_layers)


def effective_weight(fmt: str, w: torch.Tensor, name: str, num_layers: int) -> torch.Tensor:
    """The float weight a format's engine holds for the float tensor `name`."""
    if fmt == "fp8" and name.endswith("proj.weight"):
        q, scale = quantize_rows_ref(w)
        return q.float() * scale
    qtype = gguf_type(fmt, name, num_layers)
    if qtype:
        return dequantize_packed(pack(quantize(w, qtype)))
    return w


def checkpoint(cfg: ModelConfig, fmt: str, device, *, effective_of: str | None = None,
               noise: float = 0.0, base=None) -> InMemoryCheckpoint:
    """The loader's seeded dummy weights (or `base()`'s (name, float tensor) pairs, e.g. a trained
    model's): GGUF formats get their projections and output head encoded into GGML blocks,
    `effective_of` replaces those by that format's effective float weights (a bf16 reference),
    `noise` multiplies the projections by (1 + noise · N(0, 1))."""
    def stream():
        gen = torch.Generator(device=device).manual_seed(1234)
        for name, tensor in (base() if base else _dummy_weights(cfg, device)):
            if effective_of:
                tensor = effective_weight(effective_of, tensor, name, cfg.num_layers)
            if noise and name.endswith("proj.weight"):
                tensor = tensor * (1 + noise * torch.randn(tensor.shape, generator=gen, device=device))
            qtype = gguf_type(fmt, name, cfg.num_layers)
            if qtype:
                tensor = quantize(tensor, qtype)
            yield name, tensor
    return InMemoryCheckpoint(cfg, stream)


def build_engine(cfg: ModelConfig, fmt: str, device: str, *, max_num_seqs: int, token_budget: int,
                 engine_args: dict | None = None, on_host: bool = False, **checkpoint_args) -> LLMEngine:
    """fmt: a weight format, with "_kv8" appended for an FP8 KV cache (e.g. "fp8_kv8").
    engine_args: further EngineConfig fields (tests: a small KV cache). on_host: every weight
    made (and encoded) first and kept in host memory, so that the engine's load sees what a file
    gives it and none of the encoder's device temporaries."""
    weights = fmt.removesuffix("_kv8")
    quantization = "gguf" if weights in GGUF_FORMATS else ("fp8" if weights == "fp8" else None)
    config = dict(model="bench", device=device, dtype="bfloat16", max_num_batched_tokens=token_budget,
                  max_num_seqs=max_num_seqs, max_model_len=4096, quantization=quantization,
                  kv_cache_dtype="fp8" if fmt.endswith("_kv8") else "auto")
    ckpt = checkpoint(cfg, weights, device, **checkpoint_args)
    return LLMEngine(EngineConfig(**(config | (engine_args or {}))),
                     checkpoint=host_copy(ckpt) if on_host else ckpt)


def host_copy(ckpt: InMemoryCheckpoint) -> InMemoryCheckpoint:
    """ckpt's weights materialised in host memory (GGUF blocks as GGUFTensors of host bytes)."""
    def to_host(tensor):
        if isinstance(tensor, GGUFTensor):
            return GGUFTensor(tensor.qtype, tensor.data.cpu(), tensor.shape)
        return tensor.cpu()
    weights = [(name, to_host(tensor)) for name, tensor in ckpt.weights()]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return InMemoryCheckpoint(ckpt.config, lambda: iter(weights))


def step_logits(engine: LLMEngine, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy, two tokens a prompt, all prompts in one step: float32 logits [P, V] of the first
    step (prefill) and of the first decode step, rows in prompt order."""
    seen: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording(plan, *args, **kwargs):
        logits = execute(plan, *args, **kwargs)
        for row, (seq, _) in enumerate(plan.samplers):
            seen.setdefault(seq.request_id, []).append(logits[row].float().cpu())
        return logits
    engine.runner.execute = recording
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        while engine.has_unfinished:
            engine.step()
    finally:
        engine.runner.execute = execute
    if any(len(seen.get(str(i), ())) < 2 for i in range(len(prompts))):
        raise RuntimeError("a prompt did not get a prefill and a decode step: raise the budget")
    first = torch.stack([seen[str(i)][0] for i in range(len(prompts))])
    second = torch.stack([seen[str(i)][1] for i in range(len(prompts))])
    return first, second


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    return dict(rel_err=round(((logits - reference).norm() / reference.norm()).item(), 4),
                top1=round((logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4))


def compare_steps(got: tuple, ref: tuple) -> dict:
    """First step over all rows; decode step over the rows whose first token agreed (their
    decode inputs are the same)."""
    same = got[0].argmax(-1) == ref[0].argmax(-1)
    out = {f"prefill_{k}": v for k, v in compare(got[0], ref[0]).items()}
    if same.any():
        out |= {f"decode_{k}": v for k, v in compare(got[1][same], ref[1][same]).items()}
    return out


def accuracy(cfg: ModelConfig, device: str, formats, prompt_sets: list[list[list[int]]], *,
             token_budget: int = 8192, engine_args: dict | None = None, base=None,
             bf16_steps=step_logits) -> dict:
    """{'noise_floor_1pct': ..., fmt: {'vs_same_weights': ..., 'vs_bf16': ...}}, each a
    comparison per prompt set (keyed `rows<n>`: the decode step runs n rows, which picks the
    kernels, e.g. 2 rows the GEMVs and 8 rows GGUF's dequantise + cuBLAS on the GPU).
    base: the float weights to start from (`checkpoint`'s), the seeded dummy ones by default.
    bf16_steps: runs the bf16 reference's steps in place of `step_logits` (same arguments and
    result), e.g. to record more of that run than its logits."""
    args = dict(max_num_seqs=max(16, *map(len, prompt_sets)), token_budget=token_budget,
                engine_args=engine_args)

    def logits_of(fmt, eager=False, steps=step_logits, **ckpt):
        ckpt.setdefault("base", base)
        from replica.quantization import methods
        refuse = methods.fp8_device_error
        if device == "cpu" and fmt.startswith("fp8"):
            # the engine refuses FP8 off Ada/Hopper (for _scaled_mm); the model's CPU path is
            # the torch reference of the same W8A8 arithmetic, which is what a CPU check wants
            methods.fp8_device_error = lambda device: None
        try:
            engine = build_engine(cfg, fmt, device, **(args | {"engine_args": (engine_args or {}) | (
                {"enforce_eager": True, "kernel_backend": "torch"} if eager else {})}), **ckpt)
        finally:
            methods.fp8_device_error = refuse
        result = [steps(engine, prompts) for prompts in prompt_sets]
        del engine
        gc.collect()                     # the engine holds reference cycles: free its KV cache now
        if device != "cpu":
            torch.cuda.empty_cache()
        return result

    def per_set(got, ref):
        return {f"rows{len(p)}": compare_steps(g, r) for p, g, r in zip(prompt_sets, got, ref)}
    bf16 = logits_of("bf16", steps=bf16_steps)
    results = {"noise_floor_1pct": per_set(logits_of("bf16", noise=0.01), bf16)}
    if device != "cpu":
        # the torch paths (PAGEFLEET_DISABLE_TRITON, eager) on the same device: how far kernels
        # that differ only in rounding drift apart in this random model
        torch_paths = torch_reference(logits_of, "bf16")
        results["bf16_vs_torch_paths"] = per_set(bf16, torch_paths)
    for fmt in formats:
        same = logits_of("bf16", effective_of=fmt.removesuffix("_kv8"))
        got = logits_of(fmt)
        results[fmt] = {"vs_same_weights": per_set(got, same), "vs_bf16": per_set(got, bf16)}
        if fmt.startswith("fp8"):
            # bf16 on the e4m3 weights is FP8 weight-only (activations unrounded): what the decode
            # GEMV computes at 1-2 rows on the GPU
            results[fmt]["weight_only_vs_bf16"] = per_set(same, bf16)
        if device != "cpu" and fmt == "fp8":
            # W8A8 in torch (fp8_linear_ref): the same arithmetic as _scaled_mm, so this isolates
            # the GPU path (FP8 GEMV, _scaled_mm, graphs) from FP8's own activation rounding
            results[fmt]["vs_torch_w8a8"] = per_set(got, torch_reference(logits_of, "fp8"))
    return results


def torch_reference(logits_of, fmt: str):
    import os
    saved = os.environ.get("PAGEFLEET_DISABLE_TRITON")
    os.environ["PAGEFLEET_DISABLE_TRITON"] = "1"
    try:
        return logits_of(fmt, eager=True)
    finally:
        if saved is None:
            del os.environ["PAGEFLEET_DISABLE_TRITON"]
        else:
            os.environ["PAGEFLEET_DISABLE_TRITON"] = saved
