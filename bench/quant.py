"""Quantised weights on one GPU, in one run: bf16 against FP8 (W8A8) and GGUF Q4_K / Q4_0 kept
packed, on the same random Llama-3-8B-shaped weights.

    python3 bench/quant.py                 # everything (about 6 minutes on an H200)
    python3 bench/quant.py --size 1b       # quick check of the script itself
    python3 bench/quant.py --no-sweep      # keep the GGUF kernels' default tiles

Measures, per format: weights' bytes on the GPU and the KV blocks that leaves; W2 decode tok/s
(one request, 512 prompt tokens, 128 out); for bf16 and FP8 W1 and W3 requests/s; first-step
logits over W1's 256 prompts against bf16's (relative error, top-1 agreement). Before the engines,
kernel timings at the 8B projection shapes: the GGUF decode kernel (a small sweep of tiles whose
winners the engine then uses, reported beside the default) and its prefill paths (tiled GEMM vs
dequantise + cuBLAS), and FP8 (per-token quantisation + torch._scaled_mm) against bf16.

GGUF weights come from the dummy bf16 weights through our own torch Q4_K / Q4_0 encoder
(`replica/quantization/gguf_quantize.py`, checked against the gguf package's decoder in
tests/kernels/test_quant_gguf.py): no gguf package and no downloads needed on the GPU machine.
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
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.models.loader import Checkpoint, InMemoryCheckpoint, _dummy_weights  # noqa: E402
from replica.models.model_config import ModelConfig  # noqa: E402
from replica.quantization.gguf_quantize import quantize  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

RESULTS: dict = {}
DEVICE = "cuda"      # a smoke test of the helpers may set "cpu"
FORMATS = ("bf16", "fp8", "Q4_K", "Q4_0")


def emit(name: str, **values) -> None:
    RESULTS[name] = values
    print(json.dumps({"what": name, **values}), flush=True)


def model_config(size: str) -> ModelConfig:
    import transformers
    cfg = transformers.LlamaConfig(max_position_embeddings=8192, **SHAPES[size]).to_dict()
    return ModelConfig.from_hf_dict(cfg | {"architectures": ["LlamaForCausalLM"]})


def checkpoint(size: str, fmt: str):
    """The loader's dummy weights (seeded, drawn on the GPU); for a GGUF format the seven
    projections are encoded into GGML blocks on the way, everything else stays float."""
    cfg = model_config(size)
    if fmt in ("bf16", "fp8"):
        return Checkpoint(path=None, format="dummy", config=cfg)

    def stream():
        for name, tensor in _dummy_weights(cfg, DEVICE):
            yield name, (quantize(tensor, fmt) if name.endswith("proj.weight") else tensor)
    return InMemoryCheckpoint(cfg, stream)


def build_engine(size: str, fmt: str, token_budget: int, max_num_seqs: int) -> LLMEngine:
    quantization = {"bf16": None, "fp8": "fp8"}.get(fmt, "gguf")
    return LLMEngine(EngineConfig(model="bench", device=DEVICE, dtype="bfloat16",
                                  max_num_batched_tokens=token_budget, max_num_seqs=max_num_seqs,
                                  max_model_len=4096, quantization=quantization),
                     checkpoint=checkpoint(size, fmt))


def first_step_logits(engine: LLMEngine, reqs: list[list[int]], per_step: int) -> torch.Tensor:
    """Logits of each prompt's last token, `per_step` prompts a forward (no sampling)."""
    rows = []
    for start in range(0, len(reqs), per_step):
        ids = [f"logits-{start + i}" for i in range(len(reqs[start:start + per_step]))]
        for rid, p in zip(ids, reqs[start:start + per_step]):
            engine.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=1))
        plan = engine.scheduler.schedule()
        if len(plan.samplers) != len(ids):
            raise RuntimeError(f"{len(plan.samplers)} of {len(ids)} prompts fit one step: raise the budget")
        rows.append(engine.runner.execute(plan).float().cpu())
        for rid in ids:
            engine.abort_request(rid)
        engine.step() if engine.has_unfinished else None
    return torch.cat(rows)


def decode_tok_per_s(engine: LLMEngine, vocab: int) -> float:
    w2 = run(engine, [(prompts(1, [512], vocab, 1)[0], 128)])
    return round(127 / (w2["last"]["0"] - w2["first"]["0"]), 1)


# ---- kernels ---------------------------------------------------------------------------------
def _time_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=50)


def bench_gguf_kernels(size: str, sweep: bool) -> None:
    from replica.kernels import gguf_linear_triton as glt
    from replica.quantization.gguf_packed import dequantize_packed, pack
    cfg = model_config(size)
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}
    tiles = [(8, 2048, 8), (4, 2048, 8), (16, 1024, 8), (16, 512, 4), (32, 512, 8), (8, 1024, 4)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for qtype in ("Q4_K", "Q4_0"):
        for label, (n, k) in shapes.items():
            packed = pack(quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.02, qtype))
            bf16 = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            from replica.kernels.ops import linear
            figures = {"bf16_us": 1e3 * _time_ms(lambda: linear(x1, bf16)),
                       "default_us": 1e3 * _time_ms(lambda: glt.gguf_linear(x1, packed))}
            default = glt.choose_config(1, n, k, 4, x1.device, qtype)
            figures["default_config"] = str(default)
            if sweep:
                best = (figures["default_us"], default)
                for block_n, block_k, warps in tiles:
                    num_programs = -(-n // block_n)
                    split = 1
                    while num_programs * split < 4 * glt._num_sms(x1.device) and k >= 2 * split * block_k and split < 8:
                        split *= 2
                    probe = glt.GGUFLinearConfig(block_n, block_k, 1, split, warps)
                    us = 1e3 * _time_ms(lambda: glt.gguf_linear(x1, packed, config=probe))
                    if us < best[0]:
                        best = (us, probe)
                figures["best_us"], figures["best_config"] = best[0], str(best[1])
                glt.TUNED[(qtype, 1, n, k)] = best[1]
            us = figures.get("best_us", figures["default_us"])
            figures["weights_TBps"] = packed.num_bytes / (us * 1e-6) / 1e12
            figures["speedup_vs_bf16"] = figures["bf16_us"] / us
            x8 = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
            figures["m8_us"] = 1e3 * _time_ms(lambda: glt.gguf_linear(x8, packed))
            figures["m8_bf16_us"] = 1e3 * _time_ms(lambda: linear(x8, bf16))
            xp = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
            figures["prefill2048_triton_gemm_us"] = 1e3 * _time_ms(
                lambda: glt.gguf_linear(xp, packed, config=glt.GGUFLinearConfig(64, 64, 64, 1, 4, 3)))
            figures["prefill2048_dequant_cublas_us"] = 1e3 * _time_ms(
                lambda: torch.nn.functional.linear(xp, dequantize_packed(packed, torch.bfloat16)))
            figures["prefill2048_bf16_us"] = 1e3 * _time_ms(lambda: torch.nn.functional.linear(xp, bf16))
            emit(f"kernel_{qtype}_{label}", n=n, k=k, **{key: (round(v, 2) if isinstance(v, float) else v)
                                                       for key, v in figures.items()})
            del packed, bf16
    torch.cuda.empty_cache()


def bench_fp8_kernels(size: str) -> None:
    from replica.kernels.fp8_linear import quantize_rows_ref
    from replica.kernels.fp8_quant_triton import fp8_linear, quantize_per_token
    from replica.kernels.ops import linear
    cfg = model_config(size)
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for label, (n, k) in {"qkv": (q + 2 * kv, h), "gate_up": (2 * i, h), "down": (h, i)}.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w_q, w_scale = quantize_rows_ref(w)
        w_scale = w_scale[:, 0].contiguous()
        row = {}
        for m in (1, 8, 64, 256, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_us = 1e3 * _time_ms(lambda: linear(x, w))
            fp8_us = 1e3 * _time_ms(lambda: fp8_linear(x, w_q, w_scale))
            quant_us = 1e3 * _time_ms(lambda: quantize_per_token(x))
            row[f"m{m}"] = dict(bf16_us=round(bf16_us, 2), fp8_us=round(fp8_us, 2),
                                of_which_act_quant_us=round(quant_us, 2), speedup=round(bf16_us / fp8_us, 2))
        emit(f"kernel_fp8_{label}", n=n, k=k, **row)
        del w, w_q
    torch.cuda.empty_cache()


# ---- engines ---------------------------------------------------------------------------------
def bench_formats(args) -> None:
    cfg = model_config(args.size)
    vocab = cfg.vocab_size
    w1_prompts = prompts(256, [512] * 256, vocab, 2)
    reference = None
    for fmt in FORMATS:
        is_gguf = fmt.startswith("Q")
        started = time.perf_counter()
        engine = build_engine(args.size, fmt, args.token_budget, 16 if is_gguf else 256)
        figures = dict(weights_GiB=round(engine.model.num_weight_bytes / 2**30, 2),
                       num_kv_blocks=engine.block_manager.num_blocks, load_s=round(time.perf_counter() - started, 1))
        run(engine, [(p, 16) for p in prompts(8, [512] * 8, vocab, 9)])                  # warm-up
        figures["W2_decode_tok_per_s"] = decode_tok_per_s(engine, vocab)
        logits = first_step_logits(engine, w1_prompts, args.token_budget // 512)
        if reference is None:
            reference = logits
        else:
            figures["logits_rel_error_vs_bf16"] = round(((logits - reference).norm() / reference.norm()).item(), 4)
            figures["top1_agreement_vs_bf16"] = round((logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4)
        if not is_gguf:
            w1 = run(engine, [(p, 128) for p in w1_prompts])
            figures["W1_req_per_s"] = round(256 / w1["wall_s"], 2)
            figures["W1_out_tok_per_s"] = round(w1["num_out"] / w1["wall_s"], 1)
            gen = torch.Generator().manual_seed(0)
            in_lens = torch.randint(64, 1025, (1000,), generator=gen).tolist()
            out_lens = torch.randint(16, 513, (1000,), generator=gen).tolist()
            w3 = run(engine, list(zip(prompts(1000, in_lens, vocab, 3), out_lens)))
            figures["W3_req_per_s"] = round(1000 / w3["wall_s"], 2)
            figures["W3_out_tok_per_s"] = round(w3["num_out"] / w3["wall_s"], 1)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        emit(f"format_{fmt}", **figures)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def print_table() -> None:
    base = RESULTS.get("format_bf16", {})
    print(f"\n{'format':<8}{'weights GiB':>12}{'KV blocks':>11}{'W2 tok/s':>10}{'x bf16':>8}"
          f"{'W1 req/s':>10}{'x':>6}{'W3 req/s':>10}{'x':>6}{'top-1':>8}{'rel err':>9}")
    for fmt in FORMATS:
        r = RESULTS.get(f"format_{fmt}")
        if not r:
            continue

        def ratio(key):
            return f"{r[key] / base[key]:.2f}" if key in r and base.get(key) else ""
        print(f"{fmt:<8}{r['weights_GiB']:>12}{r['num_kv_blocks']:>11}{r['W2_decode_tok_per_s']:>10}"
              f"{ratio('W2_decode_tok_per_s'):>8}{r.get('W1_req_per_s', ''):>10}{ratio('W1_req_per_s'):>6}"
              f"{r.get('W3_req_per_s', ''):>10}{ratio('W3_req_per_s'):>6}"
              f"{r.get('top1_agreement_vs_bf16', ''):>8}{r.get('logits_rel_error_vs_bf16', ''):>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--no-sweep", action="store_true", help="GGUF kernels keep their default tiles")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    import triton
    emit("env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
         python=platform.python_version(), date=datetime.date.today().isoformat(), size=args.size,
         sweep=not args.no_sweep)
    if not args.skip_kernels:
        bench_gguf_kernels(args.size, sweep=not args.no_sweep)
        bench_fp8_kernels(args.size)
    bench_formats(args)
    print_table()
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    path = out / f"quant-{gpu}-{args.size}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(RESULTS, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
