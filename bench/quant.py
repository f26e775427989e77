"""Quantised weights on one GPU, in one run: bf16 against FP8 and GGUF Q4_K_M / Q4_K / Q4_0 kept
packed, on the same random Llama-3-8B-shaped weights.

    python3 bench/quant.py                                  # everything on the GPU
    python3 bench/quant.py --sections accuracy,gguf_kernels # parts: accuracy, kernels (= gguf_kernels
                                                            # + gguf8_kernels + fp8_kernels), formats
    python3 bench/quant.py --sections formats --formats bf16,Q4_K_M --quick
    python3 bench/quant.py --sections x8_kernels,formats --formats bf16,Q4_0 --quick --gguf-x auto,int8,bf16
    python3 bench/quant.py --size tiny --device cpu         # accuracy on the CPU (reference paths)

kernels: at the 8B projection shapes, the GGUF group-wise GEMV (1..16 rows; a sweep of tiles
whose winners the engine then uses) against bf16 (gguf8_kernels: the 8-bit GEMV for Q6_K and
Q8_0 at the output head's and down's shapes), dequantise + cuBLAS and the first GGUF kernel;
prefill through Triton dequantise + cuBLAS; FP8 (weight-only GEMV ≤ 8 rows, W8A8 above).
accuracy: `bench/quant_accuracy.py` (why "vs bf16 on the original weights" cannot find a bug on
random weights, and what can: each format against bf16 running its effective weights).
formats ("_kv8": the same weights with an FP8 KV cache, `--kv-cache-dtype fp8`): per format the
weights' bytes on the GPU and the KV blocks that leaves; W2 decode tok/s
(one request, 512 prompt tokens, 128 out); W1 and W3 requests/s (--quick: W2 only).

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
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES, prompts, run  # noqa: E402
from bench.quant_accuracy import accuracy, build_engine  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.kernels import pdl  # noqa: E402
from replica.models.model_config import ModelConfig  # noqa: E402
from replica.quantization.gguf_quantize import quantize  # noqa: E402

RESULTS: dict = {}
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


# ---- kernels ---------------------------------------------------------------------------------
def projection_shapes(size: str) -> dict[str, tuple[int, int]]:
    """The decoder layer's projections (fused as the engine holds them) → (N, K)."""
    cfg = model_config(size)
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}


def _time_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=50)


def _split_for(n: int, k_units: int, block_n: int, tile_units: int, device) -> int:
    """split-K so that the grid has ~8 programs per SM (as the kernels' heuristics)."""
    from replica.kernels.linear_triton import _num_sms
    split = 1
    while -(-n // block_n) * split < 8 * _num_sms(device) and k_units >= 2 * split * tile_units and split < 16:
        split *= 2
    return split


def _gemv_one_row(qtype: str, n: int, k: int, gen, probes: list):
    """The GGUF GEMV at one row of x against bf16, on random weights: the engine's default tile
    and the fastest of `probes` (GemvConfigs; none: no sweep), which the engine then uses at any
    row count. Returns (packed, the bf16 weight, figures, (µs, config) of the best)."""
    from replica.kernels import gguf_gemv_triton as gg
    from replica.kernels.ops import linear
    from replica.quantization.gguf_packed import pack
    packed = pack(quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.02, qtype))
    bf16 = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    default = gg.choose_gemv_config(1, n, k, packed.bits, x1.device, qtype)
    figures = {"bf16_us": 1e3 * _time_ms(lambda: linear(x1, bf16)),
               "default_us": 1e3 * _time_ms(lambda: gg.gguf_gemv(x1, packed, config=default)),
               "default_config": str(default)}
    best = (figures["default_us"], default)
    for probe in probes:
        us = 1e3 * _time_ms(lambda: gg.gguf_gemv(x1, packed, config=probe))
        if us < best[0]:
            best = (us, probe)
    if probes:
        figures["best_us"], figures["best_config"] = best[0], str(best[1])
        for m in range(1, gg.MAX_ROWS + 1):
            gg.TUNED[(qtype, m, n, k)] = best[1]
    return packed, bf16, figures, best


def bench_gguf_kernels(size: str, sweep: bool) -> None:
    """Per 8B projection shape and type: the group-wise GEMV at 1 row (default tile, and a sweep
    whose winner the engine then uses), at 2, 4 and 8 rows against dequantise + cuBLAS, and
    prefill at 2048 rows: Triton dequantise + cuBLAS against bf16."""
    from replica.kernels import gguf_dequant_triton as gd
    from replica.kernels import gguf_gemv_triton as gg
    from replica.kernels import gguf_linear_triton as glt
    from replica.kernels.ops import linear
    shapes = projection_shapes(size)
    # (rows, groups, warps): the 4-bit kernel's rows a thread = rows / warps (x's decoding is
    # shared by them; 4 rows a thread = 64 registers, 8 = 128)
    tiles = [(2, 32, 4), (4, 32, 4), (8, 32, 4), (16, 32, 4), (4, 64, 4), (8, 64, 8), (4, 64, 8), (8, 32, 8)]
    device = torch.device("cuda")

    def probes(n, k):
        return [gg.GemvConfig(block_n, groups, _split_for(n, k // 32, block_n, groups, device), warps)
                for block_n, groups, warps in tiles] if sweep else []
    gen = torch.Generator(device="cuda").manual_seed(0)
    gemv_rows = 8
    for qtype in ("Q4_K", "Q4_0"):
        for label, (n, k) in shapes.items():
            packed, bf16, figures, (us, _) = _gemv_one_row(qtype, n, k, gen, probes(n, k))
            figures["weights_TBps"] = packed.num_bytes / (us * 1e-6) / 1e12
            figures["speedup_vs_bf16"] = figures["bf16_us"] / us
            for m in (2, 4, 8):
                xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                figures[f"m{m}_gemv_us"] = 1e3 * _time_ms(lambda: gg.gguf_gemv(xm, packed))
                figures[f"m{m}_dequant_cublas_us"] = 1e3 * _time_ms(
                    lambda: torch.nn.functional.linear(xm, gd.dequantize(packed, xm.dtype)))
                figures[f"m{m}_bf16_us"] = 1e3 * _time_ms(lambda: linear(xm, bf16))
            xp = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
            figures["dequant_triton_us"] = 1e3 * _time_ms(lambda: gd.dequantize(packed, torch.bfloat16))
            figures["prefill2048_dequant_triton_cublas_us"] = 1e3 * _time_ms(lambda: glt.gguf_linear(xp, packed))
            figures["prefill2048_bf16_us"] = 1e3 * _time_ms(lambda: torch.nn.functional.linear(xp, bf16))
            crossover = [m for m in (2, 4, 8) if figures[f"m{m}_gemv_us"] > figures[f"m{m}_dequant_cublas_us"]]
            gemv_rows = min(gemv_rows, (crossover[0] // 2) if crossover else 8)
            emit(f"kernel_{qtype}_{label}", n=n, k=k, **{key: (round(v, 2) if isinstance(v, float) else v)
                                                       for key, v in figures.items()})
            del packed, bf16
    gg.GEMV_ROWS = gemv_rows             # the engines below use the measured crossover
    emit("gguf_gemv_rows", measured=gemv_rows)
    torch.cuda.empty_cache()


def bench_fp8_kernels(size: str, sweep: bool) -> None:
    """FP8 at 1..2048 rows: `fp8_linear` as the engine calls it (weight-only GEMV up to
    fp8_gemv_triton.GEMV_ROWS rows, W8A8 _scaled_mm above), W8A8 alone, bf16, and at 4..16 rows
    the weight-only tensor-core `fp8_dot` (off by default until measured: this sets DOT_ROWS for
    the engines of the same run to the rows where it beat W8A8 on every shape)."""
    from replica.kernels import fp8_gemv_triton as fg
    from replica.kernels.fp8_linear import quantize_rows_ref
    from replica.kernels.fp8_quant_triton import fp8_linear, quantize_per_token
    from replica.kernels.ops import linear
    cfg = model_config(size)
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    tiles = [(8, 1024, 4), (4, 2048, 8), (16, 512, 4), (8, 2048, 8), (16, 1024, 8), (4, 1024, 4)]
    dot_rows = 16
    for label, (n, k) in {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w_q, w_scale = quantize_rows_ref(w)
        w_scale = w_scale[:, 0].contiguous()
        row = {}
        if sweep:
            x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            best = (1e3 * _time_ms(lambda: fg.fp8_gemv(x1, w_q, w_scale)), fg.choose_config(1, n, k, x1.device))
            row["gemv_default"] = dict(us=round(best[0], 2), config=str(best[1]))
            for block_n, block_k, warps in tiles:
                probe = fg.Fp8GemvConfig(block_n, block_k, _split_for(n, k, block_n, block_k, x1.device), warps)
                us = 1e3 * _time_ms(lambda: fg.fp8_gemv(x1, w_q, w_scale, config=probe))
                if us < best[0]:
                    best = (us, probe)
            row["gemv_best"] = dict(us=round(best[0], 2), config=str(best[1]))
            for m in range(1, fg.MAX_ROWS + 1):
                fg.TUNED[(m, n, k)] = best[1]
        for m in (1, 2, 4, 8, 16, 64, 256, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_us = 1e3 * _time_ms(lambda: linear(x, w))
            fp8_us = 1e3 * _time_ms(lambda: fp8_linear(x, w_q, w_scale))
            x_q, x_scale = quantize_per_token(x)
            mm_us = 1e3 * _time_ms(lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale,
                                                            scale_b=w_scale.view(1, n), out_dtype=x.dtype))
            quant_us = 1e3 * _time_ms(lambda: quantize_per_token(x))
            row[f"m{m}"] = dict(bf16_us=round(bf16_us, 2), fp8_us=round(fp8_us, 2),
                                w8a8_us=round(mm_us + quant_us, 2), speedup=round(bf16_us / fp8_us, 2))
            if 2 < m <= 16:
                dot_us = 1e3 * _time_ms(lambda: fg.fp8_dot(x, w_q, w_scale))
                row[f"m{m}"]["dot_us"] = round(dot_us, 2)
                if dot_us >= mm_us + quant_us:
                    dot_rows = min(dot_rows, m // 2)
        emit(f"kernel_fp8_{label}", n=n, k=k, **row)
        del w, w_q
    fg.DOT_ROWS = max(dot_rows, fg.GEMV_ROWS)   # the engines below use the measured crossover
    emit("fp8_dot_rows", measured=fg.DOT_ROWS)
    torch.cuda.empty_cache()


def bench_gguf8_kernels(size: str, sweep: bool) -> None:
    """The 8-bit GEMV (Q6_K widened to bytes with 16-element groups, Q8_0) at one row, at the
    output head's shape and down's, against bf16: the tile the engine uses by default and a
    sweep whose winner it then uses (at 1..4 rows)."""
    from replica.kernels import gguf_gemv_triton as gg
    cfg = model_config(size)
    shapes = {"lm_head": (cfg.vocab_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size)}
    tiles = [(4, 1024, 4), (8, 512, 4), (2, 1024, 4), (4, 512, 4), (8, 1024, 8), (16, 256, 8), (4, 1024, 8),
             (2, 512, 1), (2, 1024, 2), (4, 512, 2), (2, 256, 1)]   # rows, columns, warps
    device, chunk = torch.device("cuda"), 16                    # codes a lane loads at once

    def probes(n, k):
        return [gg.GemvConfig(block_n, cols // chunk, _split_for(n, k // chunk, block_n, cols // chunk, device), warps)
                for block_n, cols, warps in tiles] if sweep else []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for qtype in ("Q6_K", "Q8_0"):
        for label, (n, k) in shapes.items():
            packed, bf16, figures, (us, _) = _gemv_one_row(qtype, n, k, gen, probes(n, k))
            figures["weights_TBps"] = packed.num_bytes / (us * 1e-6) / 1e12
            figures["bf16_TBps"] = 2 * n * k / (figures["bf16_us"] * 1e-6) / 1e12
            figures["speedup_vs_bf16"] = figures["bf16_us"] / us
            emit(f"kernel8_{qtype}_{label}", n=n, k=k, bytes=packed.num_bytes,
                 **{key: (round(v, 2) if isinstance(v, float) else v) for key, v in figures.items()})
            del packed, bf16
    torch.cuda.empty_cache()


# (x mode: "int8" / "bf16") → {(qtype, N, K): the fastest GemvConfig at one row}, from
# bench_x8_kernels' sweep; bench_formats installs the mode's winners into TUNED before each engine.
X8_BEST: dict[str, dict] = {"int8": {}, "bf16": {}}


def bench_x8_kernels(size: str, sweep: bool) -> None:
    """The 4-bit GEMV at one row with x rounded to int8 (dp4a, `gguf_gemv_x8_triton`) against
    the bf16-x kernel and bf16, at the 8B projection shapes: the int8 path whole (x's rounding
    included), its rounding alone, and (sweep) each x mode's best tile, which the formats below
    then use. The tiles include 4-8 rows x 8-16 groups a warp, where one x load serves the
    warp's rows (4x fewer bytes of x through L1 than 32 groups a warp)."""
    from replica.kernels import gguf_gemv_triton as gg
    from replica.kernels.gguf_gemv_x8_triton import quantize_x
    from replica.kernels.ops import linear
    from replica.quantization.gguf_packed import pack
    shapes = projection_shapes(size)
    # (rows, groups, warps); a warp's threads: 32 / groups rows x groups groups when groups < 32
    tiles = [(2, 32, 1), (2, 64, 2), (4, 32, 1), (2, 16, 1), (4, 64, 4), (4, 128, 4), (4, 32, 2), (16, 8, 4)]
    device = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    saved = gg.X_INT8
    try:
        for qtype in ("Q4_0", "Q4_K"):
            for label, (n, k) in shapes.items():
                packed = pack(quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.02, qtype))
                bf16 = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
                x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                figures = {"bf16_us": 1e3 * _time_ms(lambda: linear(x1, bf16)),
                           "quantize_x_us": 1e3 * _time_ms(lambda: quantize_x(x1))}
                for mode in ("bf16", "int8"):
                    gg.X_INT8 = mode == "int8"
                    default_us = 1e3 * _time_ms(lambda: gg.gguf_gemv(x1, packed))
                    figures[f"x_{mode}_default_us"] = default_us
                    best = (default_us, gg.choose_gemv_config(1, n, k, 4, device, qtype, x_int8=mode == "int8"))
                    for block_n, groups, warps in tiles if sweep else []:
                        probe = gg.GemvConfig(block_n, groups, _split_for(n, k // 32, block_n, groups, device), warps)
                        us = 1e3 * _time_ms(lambda: gg.gguf_gemv(x1, packed, config=probe))
                        figures[f"x_{mode}_{block_n}x{groups}w{warps}s{probe.split_k}_us"] = us
                        if us < best[0]:
                            best = (us, probe)
                    figures[f"x_{mode}_us"], figures[f"x_{mode}_config"] = best[0], str(best[1])
                    figures[f"x_{mode}_TBps"] = packed.num_bytes / (best[0] * 1e-6) / 1e12
                    X8_BEST[mode][(qtype, n, k)] = best[1]
                figures["int8_over_bf16_x"] = figures["x_bf16_us"] / figures["x_int8_us"]
                emit(f"kernel_x8_{qtype}_{label}", n=n, k=k, bytes=packed.num_bytes,
                     **{key: (round(v, 2) if isinstance(v, float) else v) for key, v in figures.items()})
                del packed, bf16
    finally:
        gg.X_INT8 = saved
    torch.cuda.empty_cache()


# ---- engines ---------------------------------------------------------------------------------
def bench_formats(args) -> None:
    from replica.kernels import gguf_gemv_triton as gg
    cfg = model_config(args.size)
    vocab = cfg.vocab_size
    runs = [(fmt, x) for fmt in args.formats.split(",")
            for x in (args.gguf_x.split(",") if fmt.startswith("Q") else ["auto"])]
    for fmt, gguf_x in runs:
        gg.X_INT8 = {"auto": None, "int8": True, "bf16": False}[gguf_x]
        for (qtype, n, k), config in X8_BEST.get(gguf_x, {}).items():   # the sweep's winners, if run
            for m in range(1, gg.MAX_ROWS + 1):
                gg.TUNED[(qtype, m, n, k)] = config
        started = time.perf_counter()
        engine = build_engine(cfg, fmt, "cuda", max_num_seqs=256, token_budget=args.token_budget,
                              engine_args=dict(cuda_graph_max_tokens=args.cuda_graph_max_tokens))
        figures = dict(cuda_graph_max_tokens=args.cuda_graph_max_tokens, gguf_x=gguf_x,
                       weights_GiB=round(engine.model.num_weight_bytes / 2**30, 2),
                       num_kv_blocks=engine.block_manager.num_blocks, load_s=round(time.perf_counter() - started, 1))
        run(engine, [(p, 16) for p in prompts(8, [512] * 8, vocab, 9)])                  # warm-up
        figures["W2_decode_tok_per_s"] = decode_tok_per_s(engine, vocab)
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
        emit(f"format_{fmt}" + ("" if gguf_x == "auto" else f"_x_{gguf_x}"), pdl=pdl.mode(), **figures)
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
    parser.add_argument("--gguf-x", default="auto",
                        help="4-bit GGUF decode GEMVs' x: auto (the engine's choice), int8 (dp4a), bf16; "
                             "several, comma-separated, run each")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = set(args.formats.split(",")) - set(FORMATS)
    if unknown:
        parser.error(f"--formats: unknown {', '.join(sorted(unknown))} (have {', '.join(FORMATS)})")
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
    if sections & {"kernels", "gguf_kernels"}:
        bench_gguf_kernels(args.size, sweep=not args.no_sweep)
    if sections & {"kernels", "gguf8_kernels"}:
        bench_gguf8_kernels(args.size, sweep=not args.no_sweep)
    if sections & {"kernels", "fp8_kernels"}:
        bench_fp8_kernels(args.size, sweep=not args.no_sweep)
    if "x8_kernels" in sections:
        bench_x8_kernels(args.size, sweep=not args.no_sweep)
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
