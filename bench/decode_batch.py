"""Decode at small batches, GGUF kept packed against bf16, in one run: which kernel a 4-bit
projection should take at each batch (`gguf_gemv_triton.GEMV_ROWS`, `gguf_mm_triton.MM_ROWS`)
and the small-batch GEMM's tiles.

    python3 bench/decode_batch.py                       # bf16, Q4_0, Q4_K_M; the default settings
    python3 bench/decode_batch.py --formats Q4_0 --batches 8,16 \\
        --setting mm_rows=4 --setting mm=64x128x4x3 --setting mm=32x128x4x3,ppsm=8

A setting (GGUF formats; commas between keys): gemv_rows=N, mm_rows=N (4: no small-batch GEMM,
dequantise + cuBLAS above the GEMV), mm=BLOCK_NxBLOCK_KxWARPSxSTAGES (its default config),
ppsm=N (split K until N programs an SM, at every batch), decode16=0 (the GEMM's fp32 decode), pairs=0 (its fp16
scales read one by one). One engine a format (Llama-3-8B shape, random weights,
bench/quant.py's GGUF types), its decode graphs captured again for each setting. Per batch B: B
requests of 512 prompt tokens, 128 out each, submitted at once (one prefill step, then decode
steps of B rows in the bucket B's graph). Figures: the decode steps' mean GPU ms (CUDA events),
and the decode tok/s of all B sequences by the wall clock from the last first token to the last
token. Writes bench/results/decode-batch-<gpu>-<date>.json ($OUT/decode_batch.json if set).
"""
import argparse
import datetime
import gc
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import prompts, run, write_results  # noqa: E402
from bench.quant import model_config  # noqa: E402
from bench.quant_accuracy import GGUF_FORMATS, build_engine  # noqa: E402
from replica.kernels import gguf_gemv_triton as gg, gguf_mm_triton as mm  # noqa: E402


def decode_figures(engine, batch: int, vocab: int, seed: int) -> dict:
    reqs = [(p, 128) for p in prompts(batch, [512] * batch, vocab, seed)]
    result = run(engine, reqs)
    decode = result["steps_by_kind"]["decode"]
    span_s = max(result["last"].values()) - max(result["first"].values())
    return dict(step_gpu_ms=decode["gpu_ms"], step_host_ms=decode["host_ms"],
                tok_per_s=round(batch * 127 / span_s, 1))


def apply(setting: str) -> None:
    """Module settings back to their defaults, then the setting's keys."""
    gg.GEMV_ROWS, mm.MM_ROWS, mm.DEFAULT, mm.PROGRAMS_PER_SM, mm.PROGRAMS_PER_SM_WIDE, mm.DECODE_16, mm.SCALE_PAIRS = DEFAULTS
    for item in filter(None, setting.split(",")):
        key, _, value = item.partition("=")
        if key == "gemv_rows":
            gg.GEMV_ROWS = int(value)
        elif key == "mm_rows":
            mm.MM_ROWS = int(value)
        elif key == "ppsm":
            mm.PROGRAMS_PER_SM = mm.PROGRAMS_PER_SM_WIDE = int(value)
        elif key == "pairs":
            mm.SCALE_PAIRS = bool(int(value))
        elif key == "decode16":
            mm.DECODE_16 = bool(int(value))
        elif key == "mm":
            block_n, block_k, warps, stages = map(int, value.split("x"))
            mm.DEFAULT = mm.MmConfig(block_n, block_k, 0, warps, stages)
        else:
            raise SystemExit(f"--setting: unknown key {key!r} (gemv_rows, mm_rows, mm, ppsm, decode16, pairs)")


DEFAULTS = (gg.GEMV_ROWS, mm.MM_ROWS, mm.DEFAULT, mm.PROGRAMS_PER_SM, mm.PROGRAMS_PER_SM_WIDE, mm.DECODE_16,
            mm.SCALE_PAIRS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="bf16,Q4_0,Q4_K_M")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--setting", action="append", help="GGUF formats: a setting (repeat; default: the defaults)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    cfg = model_config("8b")
    batches = [int(b) for b in args.batches.split(",")]
    results = {"env": dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           date=datetime.date.today().isoformat(),
                           command="python3 bench/decode_batch.py " + " ".join(sys.argv[1:]))}
    for fmt in args.formats.split(","):
        engine = build_engine(cfg, fmt, "cuda", max_num_seqs=max(batches), token_budget=max(8192, 512 * max(batches)))
        run(engine, [(p, 16) for p in prompts(8, [512] * 8, cfg.vocab_size, 9)])          # warm-up
        for setting in (args.setting or [""]) if fmt in GGUF_FORMATS else [""]:
            apply(setting)
            engine.runner.graphs.capture()              # again, into the same pool
            for batch in batches:
                run(engine, [(p, 8) for p in prompts(batch, [512] * batch, cfg.vocab_size, 50 + batch)])  # compiles
                figures = decode_figures(engine, batch, cfg.vocab_size, 100 + batch)
                what = f"{fmt}_{setting or 'default'}_batch_{batch}"
                results[what] = figures
                print(json.dumps({"what": what, **figures}), flush=True)
        apply("")
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    write_results(results, "decode_batch", "decode-batch")


if __name__ == "__main__":
    main()
