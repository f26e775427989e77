"""Microbenchmark of the Triton kernels on one GPU, against their byte / FLOP floors.

    python3 bench/kernels.py --out bench/results/kernels-$(date +%F).json [--sweep]
    python3 bench/kernels.py --decode-only --kv-dtypes bf16,fp8 --batches 64,256 --contexts 512,1024 --sweep

Decode attention at Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128, block size 16,
bf16) for batch 1 and 64 and contexts 512..8192: the floor is the KV bytes each step must read
(B · ctx · 8 · 128 · 2 bytes · 2 for K and V) over the measured copy bandwidth. Prefill attention
against its causal FLOPs; the element-wise kernels against their bytes, beside the torch
references. `--sweep` also times decode tile/warp/split variants. Decode times are medians of CUDA-graph
replays over rotating KV copies (see `graph_time_us`); the others are medians of
triton.testing.do_bench, which flushes L2 before every repetition. Prints a table; writes
everything as JSON.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.kernels import ops  # noqa: E402
from replica.kernels.paged_attention import build_ref_plan, paged_attention_ref  # noqa: E402
from replica.kernels.paged_decode_triton import choose_num_splits, paged_decode_attention  # noqa: E402
from replica.kernels.paged_prefill_triton import paged_prefill_attention  # noqa: E402
from replica.kernels.rms_norm import fused_add_rms_norm_ref  # noqa: E402
from replica.kernels.rotary import apply_rotary_ref  # noqa: E402
from replica.kernels.silu_mul import silu_and_mul_ref  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
BYTES = 2
NOMINAL_BW = 3.0e12    # bytes/s, read + written: the H100 anchor in ../shared/WORKLOADS.md


def median_us(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def measure_copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6)          # bytes read + written per second


def paged_kv(num_seqs: int, ctx: int, gen: torch.Generator, kv_dtype: torch.dtype = DTYPE):
    blocks_per_seq = ctx // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE,
                          generator=gen).to(kv_dtype)
    v_cache = torch.randn_like(k_cache, dtype=DTYPE).to(kv_dtype)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).int()
    return k_cache, v_cache, perm.view(num_seqs, blocks_per_seq)


def graph_time_us(calls) -> float:
    """Median time of one call, replayed from a CUDA graph that runs every call once in a row.
    Each call reads its own KV copy and the copies add up to ≥ 5× the L2, so no call is served
    from cache; the graph removes the Python launch overhead (an eager batch-1 decode costs
    more on the CPU than on the GPU), as the engine's captured decode step will."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()                                   # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(15):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def bench_decode(copy_bw: float, sweep: bool, kv_dtype: torch.dtype = DTYPE, batches=(1, 64),
                 contexts=(512, 1024, 2048, 4096, 8192)) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    kv_elem_bytes = torch.empty((), dtype=kv_dtype).element_size()
    for num_seqs in batches:
        for ctx in contexts:
            kv_bytes = 2 * num_seqs * ctx * NUM_KV_HEADS * HEAD_DIM * kv_elem_bytes
            num_copies = max(2, -(-256 * 2 ** 20 // kv_bytes))
            caches = [paged_kv(num_seqs, ctx, gen, kv_dtype)[:2] for _ in range(num_copies)]
            block_tables = paged_kv(num_seqs, ctx, gen)[2]
            seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
            out = torch.empty_like(q)
            floor_bytes = kv_bytes + 2 * q.numel() * BYTES
            floor_us = floor_bytes / copy_bw * 1e6
            auto = choose_num_splits(num_seqs, NUM_KV_HEADS, ctx, q.device)
            configs = [(64, 4, 2, auto)]
            if sweep:
                tiles = [(64, 4, 2), (128, 4, 2), (32, 4, 2)] + ([(64, 4, 3), (64, 8, 2), (128, 8, 2), (128, 4, 3),
                                                                  (256, 8, 2)] if num_seqs > 1 else [])
                split_choices = (1, 2, 4, 8, 16, 32, 64) if num_seqs == 1 else (1, 2)
                configs += [(*tile, splits) for tile in tiles for splits in split_choices]
            seen = set()
            for block_n, num_warps, num_stages, splits in configs:
                if (block_n, num_warps, num_stages, splits) in seen:
                    continue
                seen.add((block_n, num_warps, num_stages, splits))

                def make_call(k_cache, v_cache):
                    return lambda: paged_decode_attention(
                        q, k_cache, v_cache, block_tables, seq_lens, HEAD_DIM ** -0.5,
                        num_splits=splits, out=out, block_n=block_n, num_warps=num_warps,
                        num_stages=num_stages)

                calls = [make_call(k, v) for k, v in caches]
                us = graph_time_us(calls)
                row = {
                    "kernel": "decode", "kv_dtype": str(kv_dtype).removeprefix("torch."), "batch": num_seqs, "context": ctx, "block_n": block_n,
                    "num_warps": num_warps, "num_stages": num_stages, "num_splits": splits,
                    "is_default": splits == auto and (block_n, num_warps, num_stages) == (64, 4, 2),
                    "time_us": round(us, 2), "floor_us": round(floor_us, 2),
                    "floor_us_at_3TBps": round(floor_bytes / NOMINAL_BW * 1e6, 2),
                    "achieved_TBps": round(kv_bytes / (us * 1e-6) / 1e12, 3),
                    "of_floor": round(floor_us / us, 3),
                }
                if row["is_default"]:
                    row["eager_do_bench_us"] = round(median_us(calls[0]), 2)
                rows.append(row)
            del caches
    return rows


def bench_decode_reference() -> list[dict]:
    """The torch reference (the CPU path) run on the GPU, for scale."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for num_seqs, ctx in ((1, 8192), (64, 2048)):
        k_cache, v_cache, block_tables = paged_kv(num_seqs, ctx, gen)
        seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
        qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
        q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
        plan = build_ref_plan(qsl, seq_lens, block_tables, 1, ctx, BLOCK_SIZE)
        ref = paged_attention_ref(q, k_cache, v_cache, plan, 1, HEAD_DIM ** -0.5)
        tri = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, HEAD_DIM ** -0.5)
        us = median_us(lambda: paged_attention_ref(q, k_cache, v_cache, plan, 1, HEAD_DIM ** -0.5))
        rows.append({"kernel": "decode_torch_reference", "batch": num_seqs, "context": ctx,
                     "time_us": round(us, 2),
                     "max_abs_diff_vs_triton": (ref.float() - tri.float()).abs().max().item()})
    return rows


def bench_prefill(sweep: bool) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    configs = [(64, 64, 4, 2)]        # (block_m, block_n, num_warps, num_stages); first = default
    if sweep:
        configs += [(128, 64, 8, 2), (128, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3),
                    (64, 128, 4, 2)]
    rows = []
    # (name, seq_lens, query_lens): W1's prompts, and 512-token chunks after a 1536-token prefix
    for name, seq_lens, query_lens in (("w1_16x512", [512] * 16, [512] * 16),
                                       ("chunk_after_prefix", [2048] * 8, [512] * 8)):
        num_seqs = len(seq_lens)
        ctx = max(seq_lens)
        k_cache, v_cache, block_tables = paged_kv(num_seqs, ctx, gen)
        qsl = torch.zeros(num_seqs + 1, dtype=torch.int32, device="cuda")
        qsl[1:] = torch.tensor(query_lens, device="cuda").cumsum(0)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        q = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
        # causal FLOPs: QK^T and PV, 2 each per visible (query, key) pair, per head and dim
        pairs = sum(sum(s - n + i + 1 for i in range(n)) for s, n in zip(seq_lens, query_lens))
        flops = 4 * pairs * NUM_HEADS * HEAD_DIM
        baseline = None
        for block_m, block_n, num_warps, num_stages in configs:
            def run():
                return paged_prefill_attention(
                    q, k_cache, v_cache, qsl, lens, block_tables, max(query_lens), HEAD_DIM ** -0.5,
                    block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)

            out = run()
            baseline = out if baseline is None else baseline
            us = median_us(run)
            rows.append({"kernel": "prefill", "case": name, "tokens": sum(query_lens),
                         "block_m": block_m, "block_n": block_n, "num_warps": num_warps,
                         "num_stages": num_stages, "time_us": round(us, 2),
                         "TFLOPs": round(flops / (us * 1e-6) / 1e12, 1),
                         "max_diff_vs_default": (out.float() - baseline.float()).abs().max().item()})
    return rows


def bench_elementwise(copy_bw: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(3)
    num_tokens, hidden, inter = 8192, 4096, 14336

    def rand(*shape, dtype=DTYPE):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    x, residual, weight = rand(num_tokens, hidden), rand(num_tokens, hidden), rand(hidden)
    gate_up = rand(num_tokens, 2 * inter)
    q, k = rand(num_tokens, NUM_HEADS, HEAD_DIM), rand(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda", generator=gen)
    cos_sin = rand(8192, HEAD_DIM, dtype=torch.float32)
    k_cache = rand(num_tokens // BLOCK_SIZE + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device="cuda", generator=gen)[:num_tokens]
    cases = [   # (name, triton fn, torch fn, bytes moved at the floor)
        ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(x, residual, weight, 1e-5),
         lambda: fused_add_rms_norm_ref(x, residual, weight, 1e-5), 4 * x.numel() * BYTES),
        ("silu_and_mul", lambda: ops.silu_and_mul(gate_up), lambda: silu_and_mul_ref(gate_up),
         3 * num_tokens * inter * BYTES),
        ("apply_rotary", lambda: ops.apply_rotary(q, k, positions, cos_sin),
         lambda: apply_rotary_ref(q, k, positions, cos_sin), 2 * (q.numel() + k.numel()) * BYTES),
        ("write_kv_cache", lambda: ops.write_kv_cache(k, k, k_cache, v_cache, slots),
         None, 4 * k.numel() * BYTES),
    ]
    rows = []
    for name, fn, ref, floor_bytes in cases:
        us = median_us(fn)
        ref_us = median_us(ref) if ref is not None else None
        rows.append({"kernel": name, "tokens": num_tokens, "time_us": round(us, 2),
                     "torch_ref_us": None if ref_us is None else round(ref_us, 2),
                     "floor_us": round(floor_bytes / copy_bw * 1e6, 2),
                     "achieved_TBps": round(floor_bytes / (us * 1e-6) / 1e12, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--sweep", action="store_true", help="also time decode variants")
    parser.add_argument("--decode-only", action="store_true",
                        help="decode attention only, for --kv-dtypes, --batches and --contexts")
    parser.add_argument("--kv-dtypes", default="bf16", help="decode-only: bf16, fp8 or both")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    copy_bw = measure_copy_bandwidth()

    def section(fn, *fn_args):
        # one failing section must not cost the others (device time is scarce)
        try:
            return fn(*fn_args)
        except Exception as exc:   # noqa: BLE001
            print(f"{fn.__name__} failed: {exc!r}")
            return [{"error": repr(exc)}]

    if args.decode_only:
        kv_dtypes = {"bf16": DTYPE, "fp8": torch.float8_e4m3fn}
        batches, contexts = [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")]
        rows = [r for name in args.kv_dtypes.split(",")
                for r in bench_decode(copy_bw, args.sweep, kv_dtypes[name], batches, contexts)]
        for r in rows:
            print(json.dumps(r))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
                                                torch=torch.__version__, triton=triton.__version__,
                                                copy_bandwidth_TBps=round(copy_bw / 1e12, 3), decode=rows), indent=1))
        return
    result = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                   "block_size": BLOCK_SIZE, "dtype": "bfloat16"},
        "copy_bandwidth_TBps": round(copy_bw / 1e12, 3),
        "decode": section(bench_decode, copy_bw, args.sweep),
        "decode_torch_reference": section(bench_decode_reference),
        "prefill": section(bench_prefill, args.sweep), "elementwise": section(bench_elementwise, copy_bw),
    }
    print(f"{result['gpu']}  torch {result['torch']}  triton {result['triton']}  "
          f"copy {result['copy_bandwidth_TBps']} TB/s")
    print("decode, graph replay over rotating KV copies (* = default config)")
    print(f"{'B':>3} {'ctx':>5} {'BN':>4} {'w':>2} {'st':>2} {'spl':>3} {'us':>9} {'floor':>8} {'TB/s':>6} {'of floor':>8}")
    for r in result["decode"]:
        if "error" in r:
            continue
        print(f"{r['batch']:>3} {r['context']:>5} {r['block_n']:>4} {r['num_warps']:>2} {r['num_stages']:>2} "
              f"{r['num_splits']:>3} {r['time_us']:>9.1f} {r['floor_us']:>8.1f} {r['achieved_TBps']:>6.2f} "
              f"{r['of_floor']:>8.2f}{' *' if r['is_default'] else ''}")
    for r in result["decode_torch_reference"] + result["prefill"] + result["elementwise"]:
        print(json.dumps(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
