"""Would one persistent decode kernel beat a chain of launches? A load-only probe of the question.

    python3 bench/persistent_probe.py            # writes $OUT/persistent_probe.json (else bench/results/)

A Q4_0 W2 step on an H200 spends ~0.3 ms of its 1.77 ms cutting its weights into 129 dependent
GEMVs (bench/NOTES.md, "Where a 4-bit W2 step goes"): a load-only kernel over the same bytes took
1.29 ms in 129 launches and 0.98 ms in one. A persistent kernel keeps one grid resident and
separates dependent matrices with a grid-wide barrier instead of a kernel boundary; it pays off
only if that barrier costs less than a boundary under PDL. This measures both over the step's
matrices (Llama-3-8B at 4.5 bits a weight: qkv, o, gate_up, down x 32 layers, and a 6.56-bit
head; random bytes, nothing stays in L2), every variant a CUDA graph:

    launches        one launch a matrix, many short programs (as the GEMVs), PDL
    launches_grid   one launch a matrix, a resident-size grid looping over it, PDL
                    (grids: `GRIDS`, programs an SM x warps a program)
    barriers        one launch, the resident grid, a grid barrier between matrices
    barriers_l2     the same, each program asking L2 for its first chunk of the next matrix
                    before it arrives at the barrier (weights do not depend on the barrier)
    barriers_regs   the same, that chunk loaded into registers before the barrier and used
                    after it, as a persistent GEMV would load weights while x is not ready
    one_launch      one launch, the resident grid, no barrier: the floor

The barrier: each program adds 1 to a counter (release) and spins (acquire) until all programs
of the grid have arrived; the grid is at most what the SMs hold at once, so all are resident.
A program that spins too long gives up and raises a flag, so a mistake cannot hang the GPU.
"""
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_parts import graph_ms, load_only  # noqa: E402
from replica.kernels import pdl  # noqa: E402

HIDDEN, INTER, HEADS_DIM, VOCAB, LAYERS = 4096, 14336, 6144, 128256, 32
# (programs an SM, warps a program): a grid barrier's arrivals serialise on one counter, so fewer,
# wider programs arrive fewer times; each thread keeps 4 loads of 16 bytes in flight either way
GRIDS = ((2, 4), (4, 4), (8, 4), (1, 16), (2, 16), (1, 32))
SPIN_LIMIT = 1 << 14   # polls (~1 µs each) before a program gives up on a barrier, and on every later one


def matrix_words() -> list[int]:
    """int32 words of each matrix of a step, in model order."""
    def q4(rows, cols):
        return rows * cols * 9 // 16 // 4          # 4.5 bits a weight
    layer = [q4(HEADS_DIM, HIDDEN), q4(HIDDEN, HIDDEN), q4(2 * INTER, HIDDEN), q4(HIDDEN, INTER)]
    return layer * LAYERS + [VOCAB * HIDDEN * 105 // 128 // 4]    # Q6_K: 6.5625 bits


@triton.jit
def _chunk(buf_ptr, start, size, chunk, BLOCK: tl.constexpr):
    # [4, BLOCK] words: 4 loads of 16 bytes a thread
    offs = chunk * 4 * BLOCK + tl.arange(0, 4)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    return tl.load(buf_ptr + start + offs, mask=offs < size, other=0)


@triton.jit
def _phases_kernel(buf_ptr, starts_ptr, sizes_ptr, counter_ptr, sink_ptr, flag_ptr, first_phase, num_phases,
                   BLOCK: tl.constexpr, BARRIER: tl.constexpr, PREFETCH: tl.constexpr, SPIN_LIMIT: tl.constexpr,
                   PDL: tl.constexpr):
    # PREFETCH 0: none; 1: the program's first chunk of the next matrix asked of L2 before the
    # barrier; 2: loaded into registers before the barrier, used after it
    pdl.wait_and_release(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    end_phase = first_phase + num_phases
    acc = tl.zeros([4, BLOCK], dtype=tl.int32)
    ahead = tl.zeros([4, BLOCK], dtype=tl.int32)
    gave_up = 0
    if PREFETCH == 2:
        ahead = _chunk(buf_ptr, tl.load(starts_ptr + first_phase), tl.load(sizes_ptr + first_phase), pid, BLOCK)
    for phase in range(first_phase, end_phase):
        start = tl.load(starts_ptr + phase)
        size = tl.load(sizes_ptr + phase)
        first_chunk = pid
        if PREFETCH == 2:
            acc ^= ahead
            first_chunk = pid + num_programs
        for chunk in range(first_chunk, tl.cdiv(size, 4 * BLOCK), num_programs):
            acc ^= _chunk(buf_ptr, start, size, chunk, BLOCK)
        if BARRIER:
            if phase + 1 < end_phase:
                next_start = tl.load(starts_ptr + phase + 1)
                next_size = tl.load(sizes_ptr + phase + 1)
                if PREFETCH == 1:
                    offs = tl.minimum(pid * 4 * BLOCK + tl.arange(0, 4 * BLOCK), next_size - 1)
                    pdl.prefetch_l2(buf_ptr + next_start + offs)
                if PREFETCH == 2:
                    ahead = _chunk(buf_ptr, next_start, next_size, pid, BLOCK)
            tl.debug_barrier()
            tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
            target = (phase - first_phase + 1) * num_programs
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            spins = 0
            while (seen < target) & (spins < SPIN_LIMIT) & (gave_up == 0):
                seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
                spins += 1
            if spins >= SPIN_LIMIT:
                tl.atomic_add(flag_ptr, 1)
                gave_up = 1
            tl.debug_barrier()
        elif PREFETCH == 2:
            if phase + 1 < end_phase:
                ahead = _chunk(buf_ptr, tl.load(starts_ptr + phase + 1), tl.load(sizes_ptr + phase + 1), pid, BLOCK)
    tl.store(sink_ptr + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def main() -> None:
    dev = torch.device("cuda")
    words = matrix_words()
    starts = torch.tensor([sum(words[:i]) for i in range(len(words))], dtype=torch.int64, device=dev)
    sizes = torch.tensor(words, dtype=torch.int64, device=dev)
    buf = torch.randint(-2**31, 2**31 - 1, (sum(words),), dtype=torch.int32, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    sink = torch.empty(1 << 20, dtype=torch.int32, device=dev)
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    num_bytes = 4 * sum(words)

    def phases(shape, first, count, barrier=False, prefetch=0):
        per_sm, warps = shape
        if barrier:
            counter.zero_()
        _phases_kernel[(num_sms * per_sm,)](buf, starts, sizes, counter, sink, flag, first, count,
                                            BLOCK=128 * warps, BARRIER=barrier, PREFETCH=prefetch,
                                            SPIN_LIMIT=SPIN_LIMIT, num_warps=warps, **pdl.launch_options(dev))

    mats = [buf[s:s + n] for s, n in zip(starts.tolist(), words)]
    scales = buf[:1].view(torch.int16)
    results = {"num_matrices": len(words), "GB": round(num_bytes / 1e9, 3), "num_sms": num_sms, "runs": []}
    props = torch.cuda.get_device_properties(dev)

    def programs_per_sm(shape, prefetch) -> dict:
        """How many programs of this variant an SM holds at once (registers, threads, shared
        memory: the loop's pipelined loads stage through it); a barrier needs the whole grid."""
        per_sm, warps = shape
        kernel = _phases_kernel.warmup(buf, starts, sizes, counter, sink, flag, 0, 1, BLOCK=128 * warps,
                                       BARRIER=True, PREFETCH=prefetch, SPIN_LIMIT=SPIN_LIMIT, PDL=True,
                                       num_warps=warps, grid=(1,))
        if hasattr(kernel, "_init_handles"):
            kernel._init_handles()
        shared = kernel.metadata.shared
        fits = min(props.regs_per_multiprocessor // max(kernel.n_regs * 32 * warps, 1),
                   props.max_threads_per_multi_processor // (32 * warps),
                   props.shared_memory_per_multiprocessor // shared if shared else 32)
        return {"n_regs": kernel.n_regs, "shared_bytes": shared, "fit_per_sm": fits}

    def barrier_ms(shape, prefetch):
        """ms a replay, or None where the grid cannot be resident or a program gave up waiting."""
        if resident[f"{tag_of(shape)}_pf{prefetch}"]["fit_per_sm"] < shape[0]:
            return None
        before = int(flag.item())
        ms = graph_ms(lambda: phases(shape, 0, len(words), barrier=True, prefetch=prefetch))
        torch.cuda.synchronize()
        return ms if int(flag.item()) == before else None

    def tag_of(shape) -> str:
        return "{}x{}w".format(*shape)

    resident = {f"{tag_of(shape)}_pf{pf}": programs_per_sm(shape, pf) for shape in GRIDS for pf in (0, 1, 2)}
    print(json.dumps(resident), flush=True)
    results["resident"] = resident
    for run in range(2):
        row = {"launches": graph_ms(lambda: [load_only(m, scales, sink) for m in mats])}
        for shape in GRIDS:
            tag = tag_of(shape)
            row[f"launches_grid_{tag}"] = graph_ms(lambda: [phases(shape, i, 1) for i in range(len(words))])
            row[f"one_launch_{tag}"] = graph_ms(lambda: phases(shape, 0, len(words)))
            for prefetch, name in ((0, "barriers"), (1, "barriers_l2"), (2, "barriers_regs")):
                row[f"{name}_{tag}"] = barrier_ms(shape, prefetch)
            print(json.dumps({k: v for k, v in row.items() if tag in k}), flush=True)
        results["runs"].append(row)
    last = results["runs"][-1]
    best_floor = min(v for k, v in last.items() if k.startswith("one_launch"))
    results["us_per_boundary_over_floor"] = {
        key: round((value - best_floor) * 1000 / (len(words) - 1), 2) for key, value in last.items()
        if value is not None and not key.startswith("one_launch")}
    results["env"] = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                      "triton": triton.__version__, "date": datetime.date.today().isoformat(),
                      "command": "python3 bench/persistent_probe.py"}
    print(json.dumps(results["us_per_boundary_over_floor"]))
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    name = "persistent_probe.json" if "OUT" in os.environ else \
        f"persistent-probe-{torch.cuda.get_device_name(dev).replace(' ', '-')}-{results['env']['date']}.json"
    (out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
