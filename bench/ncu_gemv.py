"""A target for Nsight Compute: each Llama-3-8B decode projection's 4-bit GEMV on int8 x (qkv, o,
gate_up with its gated epilogue, down with its split-K), 3 launches each, random weights, no engine
(seconds to start, where an engine under ncu takes minutes). Needs a CUDA GPU.

    ncu --clock-control none --set full -k regex:_q4_gemv --launch-count 12 -o OUT \\
        python3 bench/ncu_gemv.py Q4_0
    ncu -i OUT.ncu-rep --page details > details.txt
    ncu -i OUT.ncu-rep --page source --print-source sass --csv > sass.csv    # stalls a SASS line

Each launch is profiled alone (no PDL, L2 flushed), so its ramp and tail are in its time, as they
are not inside the decode graph. Results: bench/results/ncu-gemv-*, bench/NOTES.md "The GEMV under ncu".
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.kernels.gguf_gemv_triton import gguf_gemv  # noqa: E402
from replica.kernels.gguf_gemv_x8_triton import quantize_x  # noqa: E402
from replica.quantization.gguf_packed import pack  # noqa: E402
from replica.quantization.gguf_quantize import quantize  # noqa: E402
from bench.sass_gemv import PROJECTIONS  # noqa: E402


def main() -> None:
    fmt = sys.argv[1] if len(sys.argv) > 1 else "Q4_0"
    if not torch.cuda.is_available():
        raise SystemExit("bench/ncu_gemv.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in PROJECTIONS.items():
        packed = pack(quantize(torch.randn(n, k, device="cuda", generator=gen) * 0.05, fmt))
        x8 = quantize_x(torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16))
        for _ in range(3):
            gguf_gemv(x8, packed, gated=name == "gate_up")
        torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
