"""The kernel sections of bench/quant.py (`--sections kernels`, `gguf_kernels`, `gguf8_kernels`,
`fp8_kernels`, `x8_kernels`): each quantised GEMV/GEMM at the model's projection shapes against
bf16, timed inside CUDA graphs (single launches would time the host). A sweep's winners go into
the kernels' TUNED tables (`x8_kernels`: into X8_BEST, which bench_formats installs per x mode),
so that the engines built later in the same process use them. Each function reports through
`emit(name, **figures)`."""
import torch

from replica.models.model_config import ModelConfig
from replica.quantization.gguf_quantize import quantize


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The decoder layer's projections (fused as the engine holds them) → (N, K)."""
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


def bench_gguf_kernels(cfg: ModelConfig, sweep: bool, emit) -> None:
    """Per 8B projection shape and type: the group-wise GEMV at 1 row (default tile, and a sweep
    whose winner the engine then uses), at 2, 4 and 8 rows against dequantise + cuBLAS, and
    prefill at 2048 rows: Triton dequantise + cuBLAS against bf16."""
    from replica.kernels import gguf_dequant_triton as gd
    from replica.kernels import gguf_gemv_triton as gg
    from replica.kernels import gguf_linear_triton as glt
    from replica.kernels.ops import linear
    shapes = projection_shapes(cfg)
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
            packed = bf16 = None         # free the GPU copies before the next shape
    gg.GEMV_ROWS = gemv_rows             # the engines below use the measured crossover
    emit("gguf_gemv_rows", measured=gemv_rows)
    torch.cuda.empty_cache()


def bench_fp8_kernels(cfg: ModelConfig, sweep: bool, emit) -> None:
    """FP8 at 1..2048 rows: `fp8_linear` as the engine calls it (weight-only GEMV up to
    fp8_gemv_triton.GEMV_ROWS rows, W8A8 _scaled_mm above), W8A8 alone, bf16, and at 4..16 rows
    the weight-only tensor-core `fp8_dot` (off by default until measured: this sets DOT_ROWS for
    the engines of the same run to the rows where it beat W8A8 on every shape)."""
    from replica.kernels import fp8_gemv_triton as fg
    from replica.kernels.fp8_linear import quantize_rows_ref
    from replica.kernels.fp8_quant_triton import fp8_linear, quantize_per_token
    from replica.kernels.ops import linear
    tiles = [(8, 1024, 4), (4, 2048, 8), (16, 512, 4), (8, 2048, 8), (16, 1024, 8), (4, 1024, 4)]
    dot_rows = 16
    for label, (n, k) in projection_shapes(cfg).items():
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
        w = w_q = None               # free the GPU copies before the next shape
    fg.DOT_ROWS = max(dot_rows, fg.GEMV_ROWS)   # the engines below use the measured crossover
    emit("fp8_dot_rows", measured=fg.DOT_ROWS)
    torch.cuda.empty_cache()


def bench_gguf8_kernels(cfg: ModelConfig, sweep: bool, emit) -> None:
    """The 8-bit GEMV (Q6_K widened to bytes with 16-element groups, Q8_0) at one row, at the
    output head's shape and down's, against bf16: the tile the engine uses by default and a
    sweep whose winner it then uses (at 1..4 rows)."""
    from replica.kernels import gguf_gemv_triton as gg
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
            packed, _, figures, (us, _) = _gemv_one_row(qtype, n, k, gen, probes(n, k))
            figures["weights_TBps"] = packed.num_bytes / (us * 1e-6) / 1e12
            figures["bf16_TBps"] = 2 * n * k / (figures["bf16_us"] * 1e-6) / 1e12
            figures["speedup_vs_bf16"] = figures["bf16_us"] / us
            emit(f"kernel8_{qtype}_{label}", n=n, k=k, bytes=packed.num_bytes,
                 **{key: (round(v, 2) if isinstance(v, float) else v) for key, v in figures.items()})
            packed = None                # free the GPU copy before the next shape
    torch.cuda.empty_cache()


# (x mode: "int8" / "bf16") → {(qtype, N, K): the fastest GemvConfig at one row}, from
# bench_x8_kernels' sweep; bench_formats installs the mode's winners into TUNED before each engine.
X8_BEST: dict[str, dict] = {"int8": {}, "bf16": {}}


def bench_x8_kernels(cfg: ModelConfig, sweep: bool, emit) -> None:
    """The 4-bit GEMV at one row with x rounded to int8 (dp4a, `gguf_gemv_x8_triton`) against
    the bf16-x kernel and bf16, at the 8B projection shapes: the int8 path whole (x's rounding
    included), its rounding alone, and (sweep) each x mode's best tile, which the formats below
    then use. The tiles include 4-8 rows x 8-16 groups a warp, where one x load serves the
    warp's rows (4x fewer bytes of x through L1 than 32 groups a warp)."""
    from replica.kernels import gguf_gemv_triton as gg
    from replica.kernels.gguf_gemv_x8_triton import quantize_x
    from replica.kernels.ops import linear
    from replica.quantization.gguf_packed import pack
    shapes = projection_shapes(cfg)
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
                packed = bf16 = None         # free the GPU copies before the next shape
    finally:
        gg.X_INT8 = saved
    torch.cuda.empty_cache()
