"""Where a 4-bit decode step's time goes, inside the model, and the decode GEMVs' tiles swept there.

    python3 bench/decode_parts.py split --format Q4_0     # the step against its parts in CUDA graphs
    python3 bench/decode_parts.py sweep --format Q4_0     # each projection's tiles, µs a layer
    python3 bench/decode_parts.py sweep --tiles "2,128,1,4 2,64,1,1,1"   # rows,groups,split_k,warps[,unroll]
    python3 bench/decode_parts.py ab --flag replica.models.llama.FUSE_DECODE_ROTARY \
        --flag replica.kernels.paged_decode_triton.MAX_SPLITS=16 --formats bf16,Q4_0

One process, the Llama-3-8B shape with random weights in a GGUF format (bench/quant.py's
formats: llama.cpp's types, the Q6_K head). One-matrix microbenchmarks replay a matrix that
partly stays in the GPU's L2 between calls; here every graph runs over all layers' real packed
weights in model order (4.5 GB for Q4_0), with PDL as in the decode graphs, so nothing does.

split: W2 tok/s of the engine (bench/quant.py's decode_tok_per_s), then graphs of
    the step's GEMVs alone (and each projection's, and the head's);
    a load-only kernel over the same packed bytes in as many launches;
    the same bytes in one launch (what the GPU streams).
sweep: each projection as the model runs it (o and down with the residual add and the next norm,
    which a split-K plan's GEMV hands its partials to, as the model does), every tile
    of --tiles (default: a grid around the defaults), µs a layer; the head's 8-bit tiles.
step: where a W2 decode step's time goes on the GPU's stream: the decode graph's replay, the
    logits after it (index_select, the head, the float copy), and the rest of the cycle until the
    next replay starts (the sampler, the copies and gathers that fill the graph's inputs), from
    CUDA events around each replay in a W2 run; the graph replayed back to back alone; and 5 steps
    under torch.profiler (the first left out, its host slowed by the profiler's start): each
    operation's share of the critical path (the time from the end of the operation before it to
    its own end; under PDL a kernel's start is not when it works).
ab: W2 of each format with module-level switches on and off (off, each alone, all), twice,
    alternating, in one process and one engine a format, its decode graphs captured again for each
    setting (the A/B each kernel change here was decided by).
Prints one JSON line per figure and writes them all to $OUT/decode_parts-<cmd>.json (else
bench/results/decode-parts-<cmd>-<gpu>-<date>.json). Needs a CUDA GPU.
"""
import argparse
import datetime
import gc
import importlib
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import prompts, run, write_results  # noqa: E402
from bench.gpu_clocks import GpuClocks  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402
from bench.quant import decode_tok_per_s, model_config  # noqa: E402
from bench.quant_accuracy import GGUF_FORMATS, build_engine  # noqa: E402
from replica.kernels import gguf_gemv_triton as gg, pdl  # noqa: E402
from replica.kernels.gguf_gemv_x8_triton import quantize_x  # noqa: E402
from replica.kernels.rms_norm_x8_triton import add_rms_norm_x8  # noqa: E402
from replica.layers.quantized_linear import gate_up_act, linear, linear_add_norm  # noqa: E402

DEFAULT_TILES = ("2,32,1,1 2,64,1,1 4,32,1,1 2,32,2,1 2,64,1,2 2,128,1,2 2,128,1,4 4,128,1,4 1,128,1,4 "
                 "2,256,1,8 2,128,2,4")
HEAD_TILES = "2,32,1,1 2,64,1,1 4,32,1,1 2,64,1,2 2,64,1,4 4,64,1,4"


@triton.jit
def _load_only_kernel(w_ptr, s_ptr, out_ptr, num_words, num_scales, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # 4 x BLOCK int32 words and BLOCK 2-byte scales a program, folded into one word (kept live)
    pdl.wait_and_release(PDL)
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.static_range(4):
        offs = (pid * 4 + j) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < num_words, other=0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    acc ^= tl.load(s_ptr + offs, mask=offs < num_scales, other=0).to(tl.int32)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def load_only(words: torch.Tensor, scales: torch.Tensor, sink: torch.Tensor) -> None:
    block = 1024
    _load_only_kernel[(triton.cdiv(words.numel(), 4 * block),)](
        words, scales, sink, words.numel(), scales.numel(), BLOCK=block, num_warps=4, **pdl.launch_options(words.device))


def graph_ms(fn, replays: int = 50) -> float:
    """Mean ms of one replay of fn captured in a CUDA graph, with PDL as in the decode graphs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), pdl.capturing_graphs():
        fn()                                    # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with pdl.capturing_graphs(), torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / replays, 4)


def w2(engine, vocab: int) -> list[float]:
    run(engine, [(p, 16) for p in prompts(8, [512] * 8, vocab, 9)])           # warm-up
    return [decode_tok_per_s(engine, vocab) for _ in range(2)]


def split(engine, cfg, emit) -> None:
    model, dev = engine.model, torch.device("cuda")
    x_hidden = quantize_x(torch.randn(1, cfg.hidden_size, device=dev, dtype=torch.bfloat16))
    x_inter = quantize_x(torch.randn(1, cfg.intermediate_size, device=dev, dtype=torch.bfloat16))
    head_x = torch.randn(1, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    mats = [(name, getattr(layer, f"{name}_weight").packed, x_inter if name == "down" else x_hidden)
            for layer in model.layers for name in ("qkv", "o", "gate_up", "down")]
    mats.append(("head", model.lm_head.packed, head_x))
    if any(p is None or p.bits != 4 for name, p, _ in mats if name != "head"):
        raise SystemExit("split: every projection must be one 4-bit packed matrix (Q4_0 or Q4_K)")
    num_bytes = sum(t.numel() * t.element_size() for _, p, _ in mats for t in (p.qweight, p.scales, p.mins)
                    if t is not None)

    def gemvs(names):
        for name, packed, x in mats:
            if name in names:
                gg.gguf_gemv(x, packed, gated=name == "gate_up")
    every = {"qkv", "o", "gate_up", "down", "head"}
    figures = {"packed_GB": round(num_bytes / 1e9, 3), "gemvs_ms": graph_ms(lambda: gemvs(every))}
    for name in sorted(every):
        figures[f"{name}_ms"] = graph_ms(lambda: gemvs({name}))
    sink = torch.empty(1 << 22, dtype=torch.int32, device=dev)
    figures["load_only_same_launches_ms"] = graph_ms(lambda: [
        load_only(p.qweight.view(torch.int32).reshape(-1), p.scales.reshape(-1).view(torch.int16), sink)
        for _, p, _ in mats])
    flat = torch.empty(num_bytes // 4, dtype=torch.int32, device=dev)
    figures["load_only_one_launch_ms"] = graph_ms(lambda: load_only(flat, flat[:1024].view(torch.int16), sink))
    figures["load_only_one_launch_TBps"] = round(num_bytes / figures["load_only_one_launch_ms"] / 1e9, 2)
    figures["gemvs_TBps"] = round(num_bytes / figures["gemvs_ms"] / 1e9, 2)
    emit("split", **figures)


def step(engine, fmt: str, vocab: int, emit) -> None:
    """A W2 run's decode cycle split by CUDA events, the graph alone, and a profiled timeline."""
    runner, graphs = engine.runner, engine.runner.graphs
    marks = []              # per decode step: (replay start, replay end, logits launched) events
    replay, execute = graphs.replay, runner.execute

    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def timed_replay(*args, **kwargs):
        marks.append([event()])
        hidden = replay(*args, **kwargs)
        marks[-1].append(event())
        return hidden

    def timed_execute(plan, *args, **kwargs):
        logits = execute(plan, *args, **kwargs)
        if marks and len(marks[-1]) == 2:
            marks[-1].append(event())
        return logits
    graphs.replay, runner.execute = timed_replay, timed_execute
    try:
        tok_per_s = w2(engine, vocab)
        marks.clear()
        decode_tok_per_s(engine, vocab)
        torch.cuda.synchronize()
    finally:
        graphs.replay, runner.execute = replay, execute
    steady = marks[8:-1]            # the last replay has no next one
    mean = lambda xs: round(sum(xs) / len(xs) * 1e3, 2)      # noqa: E731 (ms → µs)
    cycle = [a[0].elapsed_time(b[0]) for a, b in zip(steady, marks[9:])]
    in_graph = [m[0].elapsed_time(m[1]) for m in steady]
    logits = [m[1].elapsed_time(m[2]) for m in steady]
    bs, context = graphs.buckets[0], 600       # the short-context graph W2 replays (its inputs: the last step's)
    stream = torch.cuda.current_stream()
    graphs.replay(bs, 1, context)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(100):
        graphs.replay(bs, 1, context)
    end.record(stream)
    torch.cuda.synchronize()
    timeline = trace(engine, vocab)
    emit(f"step_{fmt}", tok_per_s=tok_per_s, steps=len(cycle), cycle_us=mean(cycle), graph_us=mean(in_graph),
         logits_us=mean(logits), rest_us=round(mean(cycle) - mean(in_graph) - mean(logits), 2),
         graph_alone_back_to_back_us=round(start.elapsed_time(end) / 100 * 1e3, 2),
         critical_path_us_a_step=critical_path(steady(timeline), num_steps=4), timeline=timeline)


def steady(timeline: list) -> list:
    """The timeline from the second step on: the profiler's first step waits on a host slowed by
    the profiler's start. A step begins with its two uploads (int64, int32)."""
    uploads = [i for i, (name, _, _) in enumerate(timeline) if name.startswith("Memcpy HtoD")]
    return timeline[uploads[2]:] if len(uploads) > 2 else timeline


def critical_path(timeline: list, num_steps: int) -> dict:
    """Per operation name: (calls a step, µs a step on the critical path, µs a call), the
    critical-path time of an operation being its end minus the end of the operation before it."""
    shares: dict[str, list[float]] = {}
    for (_, start, dur), (name, start2, dur2) in zip(timeline, timeline[1:]):
        shares.setdefault(name, []).append(start2 + dur2 - (start + dur))
    return {name: (round(len(v) / num_steps, 1), round(sum(v) / num_steps, 1), round(sum(v) / len(v), 2))
            for name, v in sorted(shares.items(), key=lambda kv: -sum(kv[1]))}


def trace(engine, vocab: int) -> list:
    """The GPU's operations of 5 decode steps (torch.profiler): [name, start µs from the first, µs]."""
    from torch.profiler import ProfilerActivity, profile
    engine.add_request("trace", prompts(1, [512], vocab, 3)[0],
                       SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in range(30):
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished:
        engine.step()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    t0 = events[0].time_range.start if events else 0
    return [[e.name[:60], round(e.time_range.start - t0, 1), round(e.time_range.elapsed_us(), 1)] for e in events]


def sweep(engine, cfg, tiles: str, flags: list[str], emit) -> None:
    """Each tile as is and, with --flag, with those switches on too (key "tile+NAME=VALUE")."""
    switches = [_switch(flag) for flag in flags]
    states = [("", False)] + ([("+" + _label(switches, tuple(range(len(switches)))), True)] if switches else [])
    model, dev, eps = engine.model, torch.device("cuda"), cfg.rms_norm_eps
    layers = model.layers
    residual = torch.randn(1, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    x_norm, _ = add_rms_norm_x8(torch.randn_like(residual), residual, layers[0].input_norm, eps)
    x_attn = quantize_x(torch.randn_like(residual))
    x_act = torch.randn(1, cfg.intermediate_size, device=dev, dtype=torch.bfloat16) * 0.1
    x_act8 = quantize_x(x_act)

    def rounded(pair):         # the norm's output as the next GEMV takes it (a bf16 one rounded here)
        return pair[0] if not isinstance(pair[0], torch.Tensor) else quantize_x(pair[0])
    units = {
        "qkv": lambda layer, nxt: linear(x_norm, layer.qkv_weight),
        "o": lambda layer, nxt: rounded(linear_add_norm(x_attn, layer.o_weight, residual, layer.post_norm, eps,
                                                        layer.gate_up_weight)),
        "gate_up": lambda layer, nxt: gate_up_act(x_norm, layer.gate_up_weight, layer.down_weight),
        "down": lambda layer, nxt: rounded(linear_add_norm(x_act8 if layer.down_weight.packed.bits == 4 else x_act,
                                                           layer.down_weight, residual, nxt.input_norm, eps,
                                                           nxt.qkv_weight)),
    }
    pairs = list(zip(layers, layers[1:] + layers[:1]))
    for name, unit in units.items():
        keys = {(p.qtype, 1, *p.shape) for p in (getattr(layer, f"{name}_weight").packed for layer in layers)}
        per_layer_us = {}
        for tile in tiles.split():
            config = gg.GemvConfig(*map(int, tile.split(",")))
            gg.TUNED.clear()
            gg.TUNED.update({key: config for key in keys})
            for suffix, is_on in states:
                for module, flag, on, off in switches:
                    setattr(module, flag, on if is_on else off)
                try:
                    per_layer_us[tile + suffix] = round(graph_ms(lambda: [unit(layer, nxt) for layer, nxt in pairs])
                                                        * 1000 / len(layers), 2)
                except (ValueError, ZeroDivisionError) as e:       # a tile this projection cannot take
                    per_layer_us[tile + suffix] = f"not run: {e}"[:80]
        for module, flag, _, off in switches:
            setattr(module, flag, off)
        gg.TUNED.clear()
        emit(f"sweep_{name}", unit="us a layer", **per_layer_us)
    head = model.lm_head.packed
    head_x = torch.randn(1, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    head_us = {}
    for tile in HEAD_TILES.split():
        gg.TUNED.clear()
        gg.TUNED[(head.qtype, 1, *head.shape)] = gg.GemvConfig(*map(int, tile.split(",")))
        for suffix, is_on in states:
            for module, name, on, off in switches:
                setattr(module, name, on if is_on else off)
            head_us[tile + suffix] = round(graph_ms(lambda: linear(head_x, model.lm_head)) * 1000, 1)
    for module, name, _, off in switches:
        setattr(module, name, off)
    gg.TUNED.clear()
    emit("sweep_head", unit="us", **head_us)


def _switch(flag: str):
    """module.NAME (a bool: on is True, off False) or module.NAME=VALUE (an int: on is VALUE, off the
    module's own value) → (module, NAME, on, off)."""
    flag, _, value = flag.partition("=")
    module_name, _, name = flag.rpartition(".")
    module = importlib.import_module(module_name)
    current = getattr(module, name, None)
    if value:
        if not isinstance(current, int) or isinstance(current, bool):
            raise SystemExit(f"--flag: {flag} is not a module-level int setting")
        return module, name, int(value), current
    if not isinstance(current, bool):
        raise SystemExit(f"--flag: {flag} is not a module-level True/False switch")
    return module, name, True, False


def _label(switches: list, on: tuple) -> str:
    """The settings in `on` as NAME or NAME=VALUE, a name that several modules share as module.NAME."""
    def shown(module, name):
        shared = sum(1 for m, n, _, _ in switches if n == name and m is not module) > 0
        return f"{module.__name__.rpartition('.')[2]}.{name}" if shared else name
    return "+".join(shown(m, n) if value is True else f"{shown(m, n)}={value}"
                    for m, n, value, _ in (switches[i] for i in on)) or "off"


def ab(flags: list[str], formats: str, vocab_cfg, emit) -> None:
    """Per format one engine; then twice, alternating: all switches off, each one alone on, and
    (with several) all on, the decode graphs captured again for each setting."""
    switches = [_switch(flag) for flag in flags]
    settings = [()] + [(i,) for i in range(len(switches))]
    if len({(module, name) for module, name, _, _ in switches}) > 1:     # all on, where they are different settings
        settings.append(tuple(range(len(switches))))
    for fmt in formats.split(","):
        engine = build_engine(vocab_cfg, fmt, "cuda", max_num_seqs=8, token_budget=8192)
        graphs = engine.runner.graphs
        for pass_ in (1, 2):
            for on in settings:
                for module, name, _, value_off in switches:
                    setattr(module, name, value_off)
                for module, name, value_on, _ in (switches[i] for i in on):
                    setattr(module, name, value_on)
                graphs.capture()            # again, into the same pool
                with GpuClocks() as clocks:
                    tok_per_s = w2(engine, vocab_cfg.vocab_size)
                emit(f"W2_{fmt}_{_label(switches, on)}_pass{pass_}", tok_per_s=tok_per_s, gpu_clocks=clocks.summary())
        for module, name, _, value_off in switches:      # the next format's engine is built with all off
            setattr(module, name, value_off)
        del engine, graphs
        gc.collect()              # the engine's graphs and cache sit in reference cycles
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("split", "sweep", "ab", "step"))
    parser.add_argument("--flag", action="append", help="ab, sweep: a module-level switch, e.g. "
                        "replica.models.llama.FUSE_DECODE_ROTARY, or an int setting with its value on, e.g. "
                        "replica.kernels.paged_decode_triton.MAX_SPLITS=16 (repeat for several)")
    parser.add_argument("--formats", default="bf16,Q4_0", help="ab: the formats, bf16 included")
    parser.add_argument("--format", default="Q4_0", choices=sorted(GGUF_FORMATS))
    parser.add_argument("--tiles", default=DEFAULT_TILES,
                        help="rows,groups,split_k,warps[,unroll: 1] a tile, space-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (CUDA graphs of the 8B model's decode parts)")
    results = {"env": dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           date=datetime.date.today().isoformat(), format=args.format,
                           command="python3 bench/decode_parts.py " + " ".join(sys.argv[1:]))}

    def emit(what, **figures):
        results[what] = figures
        short = {k: v for k, v in figures.items() if not (isinstance(v, list) and len(v) > 20)}   # timelines
        print(json.dumps({"what": what, **short}), flush=True)
    cfg = model_config("8b")
    if args.command == "ab":
        if not args.flag:
            parser.error("ab: --flag is required")
        ab(args.flag, args.formats, cfg, emit)
        return write(args, results)
    if args.command == "step":
        for fmt in args.formats.split(","):
            engine = build_engine(cfg, fmt, "cuda", max_num_seqs=8, token_budget=8192)
            step(engine, fmt, cfg.vocab_size, emit)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        return write(args, results)
    bf16 = build_engine(cfg, "bf16", "cuda", max_num_seqs=256, token_budget=8192)
    emit("W2_bf16", tok_per_s=w2(bf16, cfg.vocab_size))
    del bf16
    gc.collect()              # the engine's graphs and cache sit in reference cycles
    torch.cuda.empty_cache()
    engine = build_engine(cfg, args.format, "cuda", max_num_seqs=256, token_budget=8192)
    emit(f"W2_{args.format}", tok_per_s=w2(engine, cfg.vocab_size))
    if args.command == "split":
        split(engine, cfg, emit)
    else:
        sweep(engine, cfg, args.tiles, args.flag or [], emit)
    write(args, results)


def write(args, results: dict) -> None:
    write_results(results, f"decode_parts-{args.command}", f"decode-parts-{args.command}")


if __name__ == "__main__":
    main()
