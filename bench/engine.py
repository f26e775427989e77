"""Engine benchmark on one GPU: W1, W2, W3, W5 of ../shared/WORKLOADS.md, side by side with the
transformers baselines in the same process run, plus a bf16 logits check against transformers.

    python3 bench/engine.py                      # everything (about 5 minutes on an H100)
    python3 bench/engine.py --skip-hf --size 1b  # quick: our engine only, a smaller model
    python3 bench/engine.py --plot RESULTS.json  # draw the PNG of an earlier run

Prints a table last; writes bench/results/engine-<gpu>-<date>.json (and a PNG if matplotlib is
there). Random bf16 weights (Llama-3-8B shape), random prompts, EOS ignored.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.models.loader import Checkpoint, checkpoint_from_hf_model  # noqa: E402
from replica.models.model_config import ModelConfig  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, rope_theta=10000.0),
}
RESULTS: dict = {}


def write_results(results: dict, out_name: str, result_name: str) -> Path:
    """results (with results["env"]'s gpu and date) as JSON: $OUT/<out_name>.json where $OUT is set
    (a device call's folder), else bench/results/<result_name>-<gpu>-<date>.json."""
    env = results["env"]
    out = (Path(os.environ["OUT"]) / f"{out_name}.json" if os.environ.get("OUT") else
           Path(__file__).parent / "results" / f"{result_name}-{env['gpu'].replace(' ', '-')}-{env['date']}.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return out


def emit(name: str, **values) -> None:
    RESULTS[name] = values
    print(json.dumps({"what": name, **values}), flush=True)


def hf_config(size: str):
    import transformers
    return transformers.LlamaConfig(max_position_embeddings=8192, **SHAPES[size])


def exact_rope(hf) -> None:
    """`model.to(bfloat16)` also rounds the rotary `inv_freq` buffer to bf16, and `.float()` cannot
    undo it: at rope_theta 500000 that moves late positions' angles by radians. Restore the exact
    float32 frequencies so transformers is a fair reference (its forward upcasts them anyway)."""
    from replica.layers.rotary import compute_inv_freq
    cfg = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    exact = compute_inv_freq(ModelConfig.from_hf_dict(cfg)).to(hf.device)
    rotary = hf.model.rotary_emb
    rotary.inv_freq = exact.clone()
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = exact.clone()


def random_checkpoint(size: str) -> Checkpoint:
    """Random bf16-shaped weights drawn on the GPU (the loader's `dummy` format)."""
    cfg = hf_config(size).to_dict() | {"architectures": ["LlamaForCausalLM"]}
    return Checkpoint(path=None, format="dummy", config=ModelConfig.from_hf_dict(cfg))


def prompts(n: int, lengths, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (int(length),), generator=gen).tolist() for length in lengths]


def run(engine: LLMEngine, reqs: list[tuple[list[int], int]], track_waste: bool = False) -> dict:
    """Submit all at once, step to the end; returns wall time, token counts, TTFT and GPU busy share.
    Per kind of step ("decode": one token a row, the CUDA graphs; "mixed": eager, with prompt
    chunks): the mean host time of the runner's execute (building inputs and launching the
    kernels, no sync) against the mean GPU time from its events. Mixed steps whose host time
    passes their GPU time point to a launch-bound host."""
    engine.runner.step_events = events = []
    host_ms, kinds = [], []
    execute = engine.runner.execute

    def timed(plan, *args, **kwargs):
        started = time.perf_counter()
        logits = execute(plan, *args, **kwargs)
        host_ms.append((time.perf_counter() - started) * 1e3)
        kinds.append("decode" if all(e.num_new_tokens == 1 for e in plan.scheduled) else "mixed")
        return logits
    engine.runner.execute = timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, (prompt, out_len) in enumerate(reqs):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    first, last, num_out, waste = {}, {}, 0, None
    try:
        while engine.has_unfinished:
            for out in engine.step():
                now = time.perf_counter()
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                num_out += sum(len(c.new_token_ids) for c in out.outputs)
            if track_waste and waste is None and not engine.scheduler.waiting:
                bm = engine.block_manager
                allocated = (bm.num_blocks - bm.num_free_blocks) * bm.block_size
                used = sum(s.num_tokens for s in engine.scheduler.running)
                waste = (allocated - used) / allocated if allocated else 0.0
        torch.cuda.synchronize()
    finally:
        engine.runner.execute = execute
    wall = time.perf_counter() - t0
    engine.runner.step_events = None
    gpu_ms = [s.elapsed_time(e) for s, e in events]
    gpu_s = sum(gpu_ms) / 1e3
    ttft = sorted(first[k] - t0 for k in first)
    by_kind = {}
    for kind in ("decode", "mixed"):
        picked = [(h, g) for h, g, k in zip(host_ms, gpu_ms, kinds) if k == kind]
        if picked:
            by_kind[kind] = dict(steps=len(picked), host_ms=round(sum(h for h, _ in picked) / len(picked), 2),
                                 gpu_ms=round(sum(g for _, g in picked) / len(picked), 2),
                                 host_above_gpu_share=round(sum(h > g for h, g in picked) / len(picked), 3))
    return dict(wall_s=wall, num_out=num_out, ttft_first_s=ttft[0], first=first, last=last, steps_by_kind=by_kind,
                gpu_busy_share=gpu_s / wall, steps=len(events), kv_waste=waste)


def w5_req_per_s(engine: LLMEngine, vocab: int) -> dict[bool, float]:
    """W5 requests/s with prefix caching (True) and without (False); leaves caching on, cache empty."""
    prefix = prompts(1, [1024], vocab, 4)[0]
    w5_reqs = [(prefix + p, 64) for p in prompts(256, [64] * 256, vocab, 5)]
    figures = {}
    bm = engine.block_manager
    for caching in (True, False):
        bm.enable_prefix_caching = caching
        bm.hash_to_block.clear()
        for block in bm.blocks:
            block.hash = block.token_ids = None
        figures[caching] = 256 / run(engine, w5_reqs)["wall_s"]
    bm.enable_prefix_caching = True
    return figures


def graph_replay_time(engine: LLMEngine, size: str) -> dict:
    """GPU time of one batch-1 decode graph replay plus logits, with no host work between replays."""
    graphs = engine.runner.graphs
    if graphs is None:
        return {}
    def ints(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device="cuda")
    graphs.prepare(ints([1]), ints([600]), ints([16 * 40 + 7]), ints([601], torch.int32),
                   ints([list(range(40))], torch.int32))
    def step():         # the graph's own logits where its bucket computes them (cuda_graphs.LOGITS_IN_GRAPH_ROWS)
        hidden = graphs.replay(1, 1)
        logits = graphs.last_logits
        return (engine.model.compute_logits(hidden) if logits is None else logits).argmax(-1)
    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        step()
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / 50
    cfg = engine.model_config
    tensors = {id(t): t for layer in engine.model.layers for t, _, _ in layer.targets.values()}
    weight_bytes = 2 * (sum(t.numel() for t in tensors.values()) + cfg.vocab_size * cfg.hidden_size)
    return dict(step_ms=round(step_ms, 3), tok_per_s=round(1e3 / step_ms, 1),
                weights_TBps=round(weight_bytes / (step_ms / 1e3) / 1e12, 2))


def bench_engine(args) -> None:
    engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16",
                                    max_num_batched_tokens=args.token_budget, max_num_seqs=256,
                                    max_model_len=4096), checkpoint=random_checkpoint(args.size))
    vocab = engine.model_config.vocab_size
    emit("engine_config", num_kv_blocks=engine.block_manager.num_blocks, block_size=engine.config.block_size,
         token_budget=args.token_budget, cuda_graphs=engine.runner.graphs is not None,
         load_s=round(engine.load_s, 1))
    run(engine, [(p, 16) for p in prompts(32, [512] * 32, vocab, 9)])                  # warm-up
    w2 = run(engine, [(prompts(1, [512], vocab, 1)[0], 128)])
    ttft = w2["ttft_first_s"]
    emit("W2_ours", ttft_ms=round(ttft * 1e3, 1),
         decode_tok_per_s=round(127 / (w2["last"]["0"] - w2["first"]["0"]), 1),
         gpu_busy_share=round(w2["gpu_busy_share"], 3))
    emit("W2_graph_replay_only", **graph_replay_time(engine, args.size))
    w1 = run(engine, [(p, 128) for p in prompts(256, [512] * 256, vocab, 2)])
    emit("W1_ours", req_per_s=round(256 / w1["wall_s"], 2), out_tok_per_s=round(w1["num_out"] / w1["wall_s"], 1),
         wall_s=round(w1["wall_s"], 2), steps=w1["steps"], gpu_busy_share=round(w1["gpu_busy_share"], 3))
    gen = torch.Generator().manual_seed(0)
    in_lens = torch.randint(64, 1025, (1000,), generator=gen).tolist()
    out_lens = torch.randint(16, 513, (1000,), generator=gen).tolist()
    w3 = run(engine, list(zip(prompts(1000, in_lens, vocab, 3), out_lens)), track_waste=True)
    emit("W3_ours", req_per_s=round(1000 / w3["wall_s"], 2), out_tok_per_s=round(w3["num_out"] / w3["wall_s"], 1),
         wall_s=round(w3["wall_s"], 2), kv_waste_at_admission_end=round(w3["kv_waste"] or 0.0, 4),
         gpu_busy_share=round(w3["gpu_busy_share"], 3), preemptions=engine.stats().num_preemptions)
    figures = w5_req_per_s(engine, vocab)
    emit("W5_ours", req_per_s_cached=round(figures[True], 2), req_per_s_uncached=round(figures[False], 2),
         speedup=round(figures[True] / figures[False], 2))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def bench_hf_and_check(args) -> None:
    # Not under inference_mode: transformers' generate_batch updates its own tensors in place
    # from outside it, which inference tensors forbid.
    import transformers
    torch.manual_seed(0)
    with torch.device("cuda"), torch.no_grad():
        hf = transformers.LlamaForCausalLM(hf_config(args.size)).to(torch.bfloat16).eval()
    exact_rope(hf)
    hf.generation_config.eos_token_id = -1
    hf.generation_config.pad_token_id = 0
    vocab = hf.config.vocab_size
    # Correctness at W1's shape (8 prompts of 512 tokens), first-step logits. The reference is an
    # fp32 forward over the same bf16-rounded weights (with exact RoPE frequencies); both bf16
    # implementations are measured against it.
    ps = prompts(8, [512] * 8, vocab, 6)
    with torch.no_grad():
        hf16_logits = hf(torch.tensor(ps, device="cuda")).logits[:, -1].float()
    engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16", num_kv_blocks=600,
                                    max_model_len=1024, max_num_batched_tokens=4096, enforce_eager=True),
                       checkpoint=checkpoint_from_hf_model(hf))
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=1))
    ours = engine.runner.execute(engine.scheduler.schedule())
    del engine
    torch.cuda.empty_cache()
    hf.float()
    exact_rope(hf)
    with torch.no_grad():
        truth = hf(torch.tensor(ps, device="cuda")).logits[:, -1].float()
    hf.to(torch.bfloat16)
    exact_rope(hf)
    torch.cuda.empty_cache()

    def rel(a, b):
        return round(((a - b).norm() / b.norm()).item(), 5)
    emit("check_logits_bf16_W1_shape", ours_vs_fp32=rel(ours, truth), transformers_bf16_vs_fp32=rel(hf16_logits, truth),
         ours_top1_vs_fp32=(ours.argmax(-1) == truth.argmax(-1)).float().mean().item(),
         ok=rel(ours, truth) <= max(2e-2, rel(hf16_logits, truth)))
    del ours, truth, hf16_logits
    ids = torch.tensor([prompts(1, [512], vocab, 1)[0]], device="cuda")
    hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    hf.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
    torch.cuda.synchronize()
    emit("W2_hf_generate", tok_per_s=round(128 / (time.perf_counter() - t), 1))
    hf.set_attn_implementation("paged|sdpa") if hasattr(hf, "set_attn_implementation") else None
    gc = transformers.GenerationConfig(max_new_tokens=128, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batch = prompts(args.hf_requests, [512] * args.hf_requests, vocab, 2)
    hf.generate_batch(batch[:8], generation_config=gc)
    torch.cuda.synchronize()
    t = time.perf_counter()
    res = hf.generate_batch(batch, generation_config=gc)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    ntok = sum(len(r.generated_tokens) for r in res.values())
    if ntok < args.hf_requests * 128:
        emit("W1_hf_generate_batch", error=f"only {ntok} of {args.hf_requests * 128} tokens came back")
    else:
        emit("W1_hf_generate_batch", nreq=args.hf_requests, req_per_s=round(args.hf_requests / dt, 2),
             out_tok_per_s=round(ntok / dt, 1))
    del hf
    torch.cuda.empty_cache()


def plot(results: dict, path: Path) -> bool:
    """Bar charts of pagefleet vs transformers (W1, W2) and W5 with/without prefix caching."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [("W1 requests/s", results["W1_ours"]["req_per_s"], results.get("W1_hf_generate_batch", {}).get("req_per_s")),
              ("W2 decode tokens/s", results["W2_ours"]["decode_tok_per_s"], results.get("W2_hf_generate", {}).get("tok_per_s"))]
    for ax, (title, ours, ref) in zip(axes, panels):
        labels, values = ["pagefleet"], [ours]
        if ref:
            labels, values = ["transformers", "pagefleet"], [ref, ours]
        bars = ax.bar(labels, values, color=["#999999", "#2a6fdb"][-len(values):])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title)
    w5 = results["W5_ours"]
    bars = axes[2].bar(["no prefix cache", "prefix cache"], [w5["req_per_s_uncached"], w5["req_per_s_cached"]],
                       color=["#999999", "#2a6fdb"])
    axes[2].bar_label(bars, fmt="%.1f")
    axes[2].set_title(f"W5 requests/s ({w5['speedup']}x)")
    env = results.get("env", {})
    fig.suptitle(f"{env.get('gpu', '')}, Llama-3-8B shape, bf16, {env.get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-requests", type=int, default=64, help="requests in the generate_batch baseline")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--plot", metavar="RESULTS_JSON", help="only draw the PNG of an earlier run")
    args = parser.parse_args()
    if args.plot:
        source = Path(args.plot)
        plot(json.loads(source.read_text()), source.with_suffix(".png"))
        return
    import transformers
    import triton
    emit("env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
         transformers=transformers.__version__, python=platform.python_version(),
         date=datetime.date.today().isoformat(), size=args.size)
    if not args.skip_hf:
        bench_hf_and_check(args)
    bench_engine(args)
    table = [("W1 requests/s", "W1_ours", "req_per_s", "W1_hf_generate_batch", "req_per_s"),
             ("W1 output tok/s", "W1_ours", "out_tok_per_s", "W1_hf_generate_batch", "out_tok_per_s"),
             ("W2 decode tok/s", "W2_ours", "decode_tok_per_s", "W2_hf_generate", "tok_per_s"),
             ("W3 requests/s", "W3_ours", "req_per_s", None, None),
             ("W5 cached / uncached", "W5_ours", "speedup", None, None),
             ("W3 KV waste", "W3_ours", "kv_waste_at_admission_end", None, None)]
    print(f"\n{'figure':<22}{'pagefleet':>12}{'transformers':>14}{'ratio':>8}")
    for label, ours_key, ours_field, hf_key, hf_field in table:
        ours = RESULTS.get(ours_key, {}).get(ours_field)
        ref = RESULTS.get(hf_key, {}).get(hf_field) if hf_key else None
        ratio = f"{ours / ref:.1f}x" if ours and ref else ""
        print(f"{label:<22}{ours!s:>12}{ref if ref is not None else '':>14}{ratio:>8}")
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    path = out / f"engine-{gpu}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(RESULTS, indent=2))
    print(f"wrote {path}")
    if plot(RESULTS, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
