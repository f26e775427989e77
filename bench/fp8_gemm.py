"""W8A8 products at the Llama-3-8B projections and a batched step's rows: cuBLASLt
(`torch._scaled_mm`, row-wise scales) against the Triton kernel's tiles
(`replica/kernels/fp8_gemm_triton.py`) and bf16 cuBLAS, in one run on one GPU.

    python3 bench/fp8_gemm.py                     # rows 64..2048, every tile of CONFIGS
    python3 bench/fp8_gemm.py --rows 256,640

Prints, per (projection, rows), µs of each and the fastest Triton tile against cuBLASLt; writes
bench/results/fp8-gemm-<gpu>-<date>.json ($OUT if set). `fp8_gemm_triton.choose_config` is
filled from these figures.
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from replica.kernels.fp8_gemm_triton import CONFIGS, fp8_gemm  # noqa: E402
from replica.kernels.fp8_linear import Fp8Rows, quantize_rows_ref  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def time_us(fn, calls: int = 20, replays: int = 10) -> float:
    """µs of one call of fn on the device: `calls` calls captured in a CUDA graph, the median of
    `replays` replays. Timing single launches with events would measure the host's launch
    latency at these sizes (40-90 µs on the H200 machines), not the kernel; the engine runs
    decode steps in graphs anyway."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="64,128,256,384,512,768,1024,2048")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    import triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        w_q, w_scale = quantize_rows_ref(w)
        w_scale = w_scale[:, 0].contiguous()
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            rows = Fp8Rows(*quantize_rows_ref(x), torch.bfloat16)
            row = dict(proj=name, m=m, n=n, k=k)
            row["bf16_us"] = time_us(lambda: torch.nn.functional.linear(x, w))
            row["cublaslt_us"] = time_us(lambda: torch._scaled_mm(
                rows.q, w_q.t(), scale_a=rows.scale, scale_b=w_scale.view(1, n), out_dtype=torch.bfloat16))
            row["cublaslt_fast_accum_us"] = time_us(lambda: torch._scaled_mm(
                rows.q, w_q.t(), scale_a=rows.scale, scale_b=w_scale.view(1, n), out_dtype=torch.bfloat16,
                use_fast_accum=True))
            tiles = {}
            for config in CONFIGS:
                try:
                    tiles["x".join(map(str, config))] = time_us(lambda: fp8_gemm(rows, w_q, w_scale, config=config))
                except Exception as e:      # a tile that does not fit the GPU's shared memory
                    print(f"  {name} m={m} {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            best = min(tiles, key=tiles.get)
            row |= dict(triton_us=tiles, best_tile=best, best_triton_us=tiles[best],
                        cublaslt_over_best_triton=round(row["cublaslt_us"] / tiles[best], 3),
                        fp8_tflops=round(2 * m * n * k / min(tiles[best], row["cublaslt_us"]) / 1e6, 1))
            results.append(row)
            print(f"{name:8}{m:6}  bf16 {row['bf16_us']:8.1f}  cuBLASLt {row['cublaslt_us']:8.1f} "
                  f"(fast accum {row['cublaslt_fast_accum_us']:6.1f})  "
                  f"Triton {tiles[best]:8.1f} ({best})  ratio {row['cublaslt_over_best_triton']:.2f}", flush=True)
        del w, w_q
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    out = Path(args.out) / f"fp8-gemm-{gpu.replace(' ', '-')}-{date}.json"
    out.write_text(json.dumps(dict(env=dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                                            python=platform.python_version(), date=date),
                                   command="python3 bench/fp8_gemm.py " + " ".join(sys.argv[1:]),
                                   results=results), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
