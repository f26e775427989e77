"""Quantised weights on one GPU, in one run: bf16 against FP8 and GGUF Q4_K_M / Q4_K / Q4_0 kept
packed, on the same random Llama-3-8B-shaped weights.

    python3 bench/quant.py                                  # everything on the GPU
    python3 bench/quant.py --sections accuracy,gguf_kernels # parts: accuracy, kernels (= gguf_kernels
                                                            # + gguf8_kernels + fp8_kernels), formats
    python3 bench/quant.py --sections formats --formats bf16,Q4_K_M --quick
    python3 bench/quant.py --sections x8_kernels,formats --formats bf16,Q4_0 --quick --gguf-x auto,int8,bf16
    python3 bench/quant.py --size tiny --device cpu         # accuracy on the CPU (reference paths)

kernels (`bench/quant_kernels.py`): at the 8B projection shapes, the GGUF group-wise GEMV (1..16 rows; a sweep of tiles
whose winners the engine then uses) against bf16 (gguf8_kernels: the 8-bit GEMV for Q6_K and
Q8_0 at the output head's and down's shapes), dequantise + cuBLAS and the first GGUF kernel;
prefill through Triton dequantise + cuBLAS; FP8 (weight-only GEMV ≤ 8 rows, W8A8 above).
accuracy: `bench/quant_accuracy.py` (why "vs bf16 on the original weights" cannot find a bug on
random weights, and what can: each format against bf16 running its effective weights).
formats ("_kv8": the same weights with an FP8 KV cache, `--kv-cache-dtype fp8`): per format the
weights' bytes on the GPU and the KV blocks that leaves; W2 decode tok/s (one request, 512 prompt
tokens, 128 out; the median of 5 runs, with the GPU's clocks meanwhile); W1 and W3 requests/s
(--quick: W2 only).

GGUF weights come from the dummy bf16 weights through our own torch Q4_K / Q4_0 / Q6_K encoder
(`replica/quantization/gguf_quantize.py`, checked against the gguf package's decoder in
tests/kernels/test_quant_gguf.py), with the types llama.cpp gives each tensor
(`bench/quant_accuracy.GGUF_FORMATS`: the output head in Q6_K, Q4_K_M's Q6_K attn_v and
ffn_down in half the layers): no gguf package and no downloads needed on the GPU machine.
Writes bench/results/quant-<gpu>-<date>.json ($OUT if set); prints a table last.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES, prompts, run  # noqa: E402
from bench.gpu_clocks import GpuClocks  # noqa: E402
from bench.quant_accuracy import accuracy, build_engine  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.kernels import pdl  # noqa: E402
from replica.models.model_config import ModelConfig  # noqa: E402
from replica.quantization import gguf_packed  # noqa: E402
from bench import quant_kernels  # noqa: E402

RESULTS: dict = {}
Q4_K_DEFAULT = gguf_packed.Q4_K_LAYOUT
# "_kv8": the same weights with --kv-cache-dtype fp8
FORMATS = ("bf16", "fp8", "fp8_kv8", "bf16_kv8", "Q4_K_M", "Q5_K_M", "Q4_K", "Q4_0")
SIZES = SHAPES | {"tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)}


def emit(name: str, **values) -> None:
    RESULTS[name] = values
    print(json.dumps({"what": name, **values}), flush=True)
    if os.environ.get("OUT"):                      # partial results survive a timeout
        with open(Path(os.environ["OUT"]) / "partial.jsonl", "a") as f:
            f.write(json.dumps({"what": name, **values}) + "\n")


def model_config(size: str) -> ModelConfig:
    import transformers
    cfg = transformers.LlamaConfig(max_position_embeddings=8192, **SIZES[size]).to_dict()
    return ModelConfig.from_hf_dict(cfg | {"architectures": ["LlamaForCausalLM"]})


def decode_tok_per_s(engine, vocab: int) -> float:
    w2 = run(engine, [(prompts(1, [512], vocab, 1)[0], 128)])
    return round(127 / (w2["last"]["0"] - w2["first"]["0"]), 1)


W2_RUNS = 5


def w2_figures(engine, vocab: int) -> dict:
    """W2 decode tok/s: the median of W2_RUNS runs (each 0.2-0.5 s), every run, and what the GPU's
    clocks did meanwhile (`GpuClocks`): one slow run, or a whole slow format, shows which it was."""
    with GpuClocks() as clocks:
        runs = [decode_tok_per_s(engine, vocab) for _ in range(W2_RUNS)]
    return {"W2_decode_tok_per_s": statistics.median(runs), "W2_runs": runs, "W2_gpu_clocks": clocks.summary()}


def memory_figures(engine) -> dict:
    """The KV sizing's figures (GiB): what the weights' tensors hold, what the allocator holds
    beside them, the profiled activation peak; the KV budget the rule gave."""
    profile = engine.memory_profile
    if profile is None:
        return {}
    gib = lambda n: round(n / 2**30, 3)      # noqa: E731
    return dict(allocated_after_weights_GiB=gib(profile.allocated_after_weights_bytes),
                reserved_after_weights_GiB=gib(profile.reserved_after_weights_bytes),
                activation_peak_GiB=gib(profile.activation_peak_bytes),
                kv_budget_GiB=gib(profile.kv_budget_bytes))


# ---- engines ---------------------------------------------------------------------------------
def bench_formats(args) -> None:
    from replica.kernels import gguf_gemv_triton as gg
    cfg = model_config(args.size)
    vocab = cfg.vocab_size
    runs = [(fmt, x, seqs, q6k, q4k) for fmt in args.formats.split(",")
            for x in (args.gguf_x.split(",") if fmt.startswith("Q") else ["auto"])
            for seqs in map(int, args.max_num_seqs.split(","))
            for q6k in (map(int, args.q6k_bits.split(",")) if fmt.startswith("Q") else [6])
            for q4k in (args.q4k_layout.split(",") if fmt.startswith("Q4_K") else [Q4_K_DEFAULT])]
    for fmt, gguf_x, max_num_seqs, q6k_bits, q4k_layout in runs:
        gg.X_INT8 = {"auto": None, "int8": True, "bf16": False}[gguf_x]
        gguf_packed.SIX_BIT_Q6_K = q6k_bits == 6
        gguf_packed.Q4_K_LAYOUT = q4k_layout
        for (qtype, n, k), config in quant_kernels.X8_BEST.get(gguf_x, {}).items():   # the sweep's winners, if run
            for m in range(1, gg.MAX_ROWS + 1):
                gg.TUNED[(qtype, m, n, k)] = config
        started = time.perf_counter()
        engine = build_engine(cfg, fmt, "cuda", max_num_seqs=max_num_seqs, token_budget=args.token_budget,
                              engine_args=dict(cuda_graph_max_tokens=args.cuda_graph_max_tokens),
                              on_host=args.weights_from_host)
        figures = dict(cuda_graph_max_tokens=args.cuda_graph_max_tokens, gguf_x=gguf_x, max_num_seqs=max_num_seqs,
                       q6k_bits=q6k_bits, q4k_layout=q4k_layout, weights_from_host=args.weights_from_host,
                       weights_GiB=round(engine.model.num_weight_bytes / 2**30, 2),
                       num_kv_blocks=engine.block_manager.num_blocks, load_s=round(time.perf_counter() - started, 1),
                       **memory_figures(engine))
        run(engine, [(p, 16) for p in prompts(8, [512] * 8, vocab, 9)])                  # warm-up
        figures.update(w2_figures(engine, vocab))
        if not args.quick:
            w1_prompts = prompts(256, [512] * 256, vocab, 2)
            gen = torch.Generator().manual_seed(0)
            in_lens = torch.randint(64, 1025, (1000,), generator=gen).tolist()
            out_lens = torch.randint(16, 513, (1000,), generator=gen).tolist()
            w3_requests = list(zip(prompts(1000, in_lens, vocab, 3), out_lens))
            # Warm-up of the batch shapes: a first pass JIT-compiles the Triton kernels' shape
            # specialisations it meets (seconds each), which the first format measured would
            # otherwise pay inside W1 (2026-11-29: bf16 W1 42.8 req/s first, 54.4 with the same
            # kernels already compiled). W1's shapes and 300 of W3's, on other prompts (the same
            # ones would hit the prefix cache in the timed pass).
            warm_w1 = [(p, 128) for p in prompts(256, [512] * 256, vocab, 102)]
            figures["W1_first_pass_req_per_s"] = round(256 / run(engine, warm_w1)["wall_s"], 2)
            run(engine, list(zip(prompts(300, in_lens[:300], vocab, 103), out_lens[:300])))
            w1 = run(engine, [(p, 128) for p in w1_prompts])
            figures["W1_req_per_s"] = round(256 / w1["wall_s"], 2)
            figures["W1_out_tok_per_s"] = round(w1["num_out"] / w1["wall_s"], 1)
            figures["W1_gpu_busy_share"] = round(w1["gpu_busy_share"], 3)
            w3 = run(engine, w3_requests)
            figures["W3_req_per_s"] = round(1000 / w3["wall_s"], 2)
            figures["W3_out_tok_per_s"] = round(w3["num_out"] / w3["wall_s"], 1)
            figures["W3_gpu_busy_share"] = round(w3["gpu_busy_share"], 3)
            figures["W3_steps"] = w3["steps"]
            figures["W3_steps_by_kind"] = w3["steps_by_kind"]
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        emit(f"format_{fmt}" + ("" if gguf_x == "auto" else f"_x_{gguf_x}")
             + ("" if max_num_seqs == 256 else f"_seqs_{max_num_seqs}")
             + ("" if q6k_bits == 6 else f"_q6k_{q6k_bits}")
             + ("" if q4k_layout == Q4_K_DEFAULT else f"_q4k_{q4k_layout}"), pdl=pdl.mode(), **figures)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def bench_accuracy(args) -> None:
    cfg = model_config(args.size)
    length = 64 if args.size == "tiny" else 256
    sets = [prompts(num, [length] * num, cfg.vocab_size, 2 + num) for num in (2, 8)]
    results = accuracy(cfg, args.device, [f for f in args.formats.split(",") if f != "bf16"], sets, token_budget=max(args.token_budget, 8 * length))
    for name, figures in results.items():
        emit(f"accuracy_{name}", **figures)


def print_table() -> None:
    base = RESULTS.get("format_bf16", {})
    print(f"\n{'format':<8}{'weights GiB':>12}{'KV blocks':>11}{'W2 tok/s':>10}{'x bf16':>8}"
          f"{'W1 req/s':>10}{'x':>6}{'W3 req/s':>10}{'x':>6}")
    for fmt in FORMATS:
        r = RESULTS.get(f"format_{fmt}")
        if not r:
            continue

        def ratio(key):
            return f"{r[key] / base[key]:.2f}" if key in r and base.get(key) else ""
        print(f"{fmt:<8}{r['weights_GiB']:>12}{r['num_kv_blocks']:>11}{r['W2_decode_tok_per_s']:>10}"
              f"{ratio('W2_decode_tok_per_s'):>8}{r.get('W1_req_per_s', ''):>10}{ratio('W1_req_per_s'):>6}"
              f"{r.get('W3_req_per_s', ''):>10}{ratio('W3_req_per_s'):>6}")
    for name, figures in RESULTS.items():
        if name.startswith("accuracy_"):
            print(name.removeprefix("accuracy_"), json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8b", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: accuracy only")
    parser.add_argument("--sections", default="kernels,accuracy,formats")
    parser.add_argument("--no-sweep", action="store_true", help="the kernels keep their default tiles")
    parser.add_argument("--quick", action="store_true", help="formats: W2 only (no W1, W3)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"of {', '.join(FORMATS)}")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--cuda-graph-max-tokens", type=int, default=EngineConfig.cuda_graph_max_tokens,
                        help="steps with prefill chunks up to this many tokens replay piecewise graphs (0: eager)")
    parser.add_argument("--max-num-seqs", default="256",
                        help="sequences a step holds (W3 sends 1,000 at once); several, comma-separated, run each")
    parser.add_argument("--gguf-x", default="auto",
                        help="4-bit GGUF decode GEMVs' x: auto (the engine's choice), int8 (dp4a), bf16; "
                             "several, comma-separated, run each")
    parser.add_argument("--q6k-bits", default="6",
                        help="GGUF formats: Q6_K tensors (the head) kept at 6 bits or widened to 8; "
                             "several, comma-separated, run each")
    parser.add_argument("--q4k-layout", default=Q4_K_DEFAULT,
                        help="Q4_K formats: its scales' layout(s), of super, paired, flat (gguf_packed.Q4_K_LAYOUT)")
    parser.add_argument("--weights-from-host", action="store_true",
                        help="formats: build each format's weights in host memory first, so that the engine "
                             "loads them as from a file (by default they are made and encoded on the GPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = set(args.formats.split(",")) - set(FORMATS)
    if unknown:
        parser.error(f"--formats: unknown {', '.join(sorted(unknown))} (have {', '.join(FORMATS)})")
    if not all(v.isdigit() and int(v) > 0 for v in args.max_num_seqs.split(",")):
        parser.error(f"--max-num-seqs: positive integers, comma-separated, got {args.max_num_seqs!r}")
    if set(args.q4k_layout.split(",")) - {"paired", "super", "flat"}:
        parser.error(f"--q4k-layout: paired, super, flat or several comma-separated, got {args.q4k_layout!r}")
    if not args.q6k_bits or set(args.q6k_bits.split(",")) - {"6", "8"}:
        parser.error(f"--q6k-bits: 6, 8 or both comma-separated, got {args.q6k_bits!r}")
    if not args.gguf_x or set(args.gguf_x.split(",")) - {"auto", "int8", "bf16"}:
        parser.error(f"--gguf-x: auto, int8, bf16 or a comma-separated list of them, got {args.gguf_x!r}")
    on_gpu = args.device == "cuda"
    if not on_gpu:
        sections &= {"accuracy"}
    import triton
    emit("env", gpu=torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
         torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
         date=datetime.date.today().isoformat(), size=args.size, sweep=not args.no_sweep,
         command="python3 bench/quant.py " + " ".join(sys.argv[1:]))
    if "accuracy" in sections:
        bench_accuracy(args)
    cfg, sweep = model_config(args.size), not args.no_sweep
    if sections & {"kernels", "gguf_kernels"}:
        quant_kernels.bench_gguf_kernels(cfg, sweep, emit)
    if sections & {"kernels", "gguf8_kernels"}:
        quant_kernels.bench_gguf8_kernels(cfg, sweep, emit)
    if sections & {"kernels", "fp8_kernels"}:
        quant_kernels.bench_fp8_kernels(cfg, sweep, emit)
    if "x8_kernels" in sections:
        quant_kernels.bench_x8_kernels(cfg, sweep, emit)
    if "formats" in sections:
        bench_formats(args)
    print_table()
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = RESULTS["env"]["gpu"].replace(" ", "-") if on_gpu else "cpu"
    path = out / f"quant-{name}-{args.size}-{'-'.join(sorted(sections))}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(RESULTS, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
