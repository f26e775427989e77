"""pagefleet against llama.cpp's server (the engine inside Ollama): same weights, same requests.

Three servers, one after the other, each loaded with the same requests through its
OpenAI-compatible `/v1/completions` by the project's load generator (fleetctl/loadgen.py: random
token-id prompts, exact output lengths through `ignore_eos`, which llama-server accepts too):

    ollama_defaults  llama-server as Ollama runs it by default: one slot (OLLAMA_NUM_PARALLEL=1),
                     a 4096-token context (num_ctx), batch 512 (num_batch), no flash attention
                     (OLLAMA_FLASH_ATTENTION unset), every layer on the GPU (Ollama offloads all
                     that fit; an 8B model fits an H200).
    llamacpp_best    llama-server tuned for concurrency: --parallel N slots (N = the largest
                     concurrency), a context of N x --slot-ctx tokens so each slot holds the
                     longest request, flash attention, continuous batching (-cb), -ngl 999.
    pagefleet        one `replica serve` on the same file (GGUF dequantised on load, or kept
                     quantised with --pagefleet-quantization gguf), or on --pagefleet-model (the HF
                     folder the GGUF was converted from).

Workloads (WORKLOADS.md): W2 = one stream, 512 prompt / 128 output tokens; then W4's lengths
(prompts 64-1024, outputs 16-512 tokens, uniform) at each --concurrency. The one-slot server
serves one request at a time, so beyond --one-slot-max-concurrency its throughput is its c=1
figure and only its queueing grows: it is not run there (the JSON says so). Every server gets a
short warm-up on other prompts first (no prefix-cache hits in the measured runs).

Writes bench/results/vs-llamacpp-<device>-<model>-<date>.json and .png: requests/s, output
tokens/s, TTFT and ITL p50/p99 per server and workload, ratios pagefleet / llama.cpp, the
device (GPU name or CPU model), load average before and after each run (shared machines),
versions (torch, pagefleet commit, `llama-server --version`, llama.cpp build flags from the
build folder's CMakeCache.txt), and whether pagefleet kept the GGUF quantised.

CPU (this repository's bundled SmolLM2, Q4_1 with a Q8_0 embedding; about 20 minutes on 2 shared cores):

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/sd      # 73 MiB sdist
    python bench/vs_llamacpp.py pack-llamacpp /tmp/sd/llama_cpp_python-0.3.36.tar.gz /tmp/llamacpp
    cmake -S /tmp/llamacpp -B /tmp/llamacpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build /tmp/llamacpp/build --target llama-server -j          # 18 min on 2 busy cores
    python bench/vs_llamacpp.py --llama-server /tmp/llamacpp/build/bin/llama-server --gguf smollm2 \
        --device cpu --concurrency 1,16 --num-requests 3,16 --w2-requests 2 \
        --one-slot-max-concurrency 1 --llama-source "llama-cpp-python 0.3.36 sdist"

GPU (one H200; the device machine has no network but has nvcc 13.0, CMake and ninja, so llama.cpp
is built there from the llama-cpp-python sdist, which vendors llama.cpp's source).

  Here, before the device calls (once; .carry is git-ignored, ~32 MiB, so it is carried):
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/sd
    python bench/vs_llamacpp.py pack-llamacpp /tmp/sd/llama_cpp_python-0.3.36.tar.gz .carry/llamacpp
        # drops docs, models, tests, examples, the web UI's sources and the non-CUDA GPU backends:
        # 73 MiB of sdist -> 28 MiB; configures with tests, examples and the UI off
    python bench/vs_llamacpp.py export-tokenizer .carry/tokenizer
        # SmolLM2's tokenizer as HF files (3.4 MiB): convert_hf_to_gguf.py needs a tokenizer it
        # recognises ("smollm"), and pads the vocabulary to the checkpoint's 128256 with [PAD] tokens

  Device call 1 (carry .carry; ~5-8 min: the CUDA build for sm_90 only, two targets):
    cmake -S .carry/llamacpp -B .carry/llamacpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
      && cmake --build .carry/llamacpp/build --target llama-server llama-quantize -j16

  Device call 2 (the same warm machine, with no carry: naming .carry again would replace the
  build folder there; PYTHONPATH gives the converter the sdist's gguf-py, as the image has no
  `gguf`; pagefleet serving a GGUF also needs the `gguf` wheel installed, e.g. into /tmp/site from
  a carried `.whl/`, since transformers' GGUF tokenizer reader checks the installed version):
    export PYTHONPATH=$PWD:$PWD/.carry/llamacpp/gguf-py L=.carry/llamacpp/build/bin
    python3 bench/vs_llamacpp.py make-checkpoint /tmp/ck8b --tokenizer .carry/tokenizer \
    && python3 .carry/llamacpp/convert_hf_to_gguf.py /tmp/ck8b --outtype bf16 --outfile /tmp/8b-bf16.gguf \
    && $L/llama-quantize /tmp/8b-bf16.gguf /tmp/8b-q4km.gguf Q4_K_M \
    && python3 bench/vs_llamacpp.py --llama-server $L/llama-server --gguf /tmp/8b-bf16.gguf \
         --pagefleet-model /tmp/ck8b --device cuda --out $OUT --llama-source "llama-cpp-python 0.3.36 sdist"

  Device call 3 (the same machine, no carry, the same exports; 4-bit; Q8_0 likewise with `llama-quantize ... Q8_0`):
    python3 bench/vs_llamacpp.py --llama-server $L/llama-server --gguf /tmp/8b-q4km.gguf \
         --pagefleet-quantization gguf --device cuda --servers llamacpp_best,pagefleet \
         --concurrency 1,32,128 --out $OUT --tag q4km

  Q4_K_M keeps a few tensors in Q6_K (attn_v and ffn_down of some layers, the output head):
  pagefleet keeps the Q4_K ones packed and dequantises the Q6_K ones to bf16 (the JSON's
  gguf_facts counts tensors by type).

Invariants: every server sees the same request list at a given concurrency (the one-slot server
the same list, or none); a run with errors or short outputs is reported, not hidden
(`num_errors`, `num_short_outputs`); every server process is ended before the next starts.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetctl.loadgen import BenchConfig, RequestSpec, make_requests, run_benchmark  # noqa: E402
from fleetctl.loadgen_report import summarize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_prep  # noqa: E402  (bench/llamacpp_prep.py)
from vs_llamacpp_report import (SERVERS, device_name, gguf_facts, git_commit, llama_build_flags,  # noqa: E402
                                llama_server_version, load_average, print_table, ratios, write_png)

W4_PROMPT_LEN, W4_OUTPUT_LEN = (64, 1024), (16, 512)
W2_PROMPT_LEN, W2_OUTPUT_LEN = 512, 128
# Ollama's defaults (envconfig / api.DefaultOptions): num_ctx 4096, num_batch 512, one slot, no FA.
OLLAMA_NUM_CTX, OLLAMA_NUM_BATCH = 4096, 512


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_cmd(args, config: str, port: int) -> list[str]:
    ngl = "999" if args.device.startswith("cuda") else "0"
    cmd = [args.llama_server, "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
           "-ngl", ngl, "--no-webui",
           # Random prompts never hit a cache: don't spend time copying finished slots to host RAM
           # (Ollama's runner has no such cache either).
           "--cache-ram", "0"]
    if args.threads:
        cmd += ["-t", str(args.threads), "-tb", str(args.threads)]
    if config == "ollama_defaults":
        return cmd + ["--parallel", "1", "-c", str(OLLAMA_NUM_CTX), "-b", str(OLLAMA_NUM_BATCH),
                      "-ub", str(OLLAMA_NUM_BATCH), "-fa", "off"]
    slots = max(args.concurrency)
    return cmd + ["--parallel", str(slots), "-c", str(slots * args.slot_ctx), "-fa", "on", "-cb",
                  "-b", "2048", "-ub", "512"]


def pagefleet_cmd(args, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "replica.cli", "serve", "--model", str(args.pagefleet_model or args.gguf),
           "--served-model-name", "bench", "--port", str(port), "--device", args.device,
           "--max-num-seqs", str(max(256, max(args.concurrency))), "--max-queue", "100000",
           "--log-level", "warning"]
    if args.pagefleet_quantization:
        cmd += ["--quantization", args.pagefleet_quantization]
    return cmd + args.pagefleet_arg


def start(cmd: list[str], port: int, log_path: Path, ready_path: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} was not ready in 900 s (log: {log_path})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- load

def workloads(args) -> list[tuple[str, int, list[RequestSpec]]]:
    """(name, concurrency, requests): W2, then W4's lengths at each concurrency."""
    vocab = args.vocab_size
    runs = [("W2", 1, make_requests(args.w2_requests, (W2_PROMPT_LEN,) * 2, (W2_OUTPUT_LEN,) * 2,
                                    vocab_size=vocab, seed=2))]
    for c, n in zip(args.concurrency, args.num_requests):
        runs.append((f"W4_c{c}", c, make_requests(n, W4_PROMPT_LEN, W4_OUTPUT_LEN, vocab_size=vocab, seed=100 + c)))
    return runs


def measure(url: str, concurrency: int, requests: list[RequestSpec], ignore_eos: bool) -> dict:
    config = BenchConfig(url, "bench", concurrency=concurrency, ignore_eos=ignore_eos, timeout_s=1800)
    load_before = load_average()
    run = asyncio.run(run_benchmark(config, requests))
    s = summarize(run)
    return dict(num_requests=s["num_requests"], concurrency=concurrency, num_errors=s["num_errors"],
                errors_by_status=s["errors_by_status"], num_short_outputs=s["num_short_outputs"],
                req_per_s=round(s["requests_per_s"], 3), out_tok_per_s=round(s["output_tokens_per_s"], 1),
                ttft_ms_p50=_r(s["ttft_ms"]["p50"]), ttft_ms_p99=_r(s["ttft_ms"]["p99"]),
                itl_ms_p50=_r(s["itl_ms"]["p50"]), itl_ms_p99=_r(s["itl_ms"]["p99"]),
                wall_s=round(run.duration_s, 2), load_avg_before=load_before, load_avg_after=load_average())


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def bench_server(args, name: str, runs, log_dir: Path, out: dict) -> None:
    """Fills `out` (command, startup_s, runs) as it goes, so that a failure keeps what was measured."""
    port = free_port()
    if name == "pagefleet":
        cmd, ready = pagefleet_cmd(args, port), "/ready"
    else:
        cmd, ready = llama_server_cmd(args, name, port), "/health"
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    out["command"] = cmd
    t0 = time.perf_counter()
    proc = start(cmd, port, log_dir / f"{name}.log", ready)
    out["startup_s"] = round(time.perf_counter() - t0, 1)
    url = f"http://127.0.0.1:{port}"
    try:
        warm = make_requests(args.warmup_requests, (64, 256), (8, 16), vocab_size=args.vocab_size, seed=1)
        measure(url, min(len(warm), max(args.concurrency)), warm, ignore_eos=True)
        for wname, c, reqs in runs:
            if name == "ollama_defaults" and c > args.one_slot_max_concurrency:
                out["runs"][wname] = {"skipped": f"one slot serves one request at a time: its throughput "
                                                 f"is the W4_c1 figure and only its queueing grows above "
                                                 f"concurrency {args.one_slot_max_concurrency}"}
                continue
            out["runs"][wname] = row = measure(url, c, reqs, ignore_eos=True)
            print(json.dumps({"server": name, "workload": wname, **row}), flush=True)
    finally:
        stop(proc)


def merge_earlier_rows(args, servers: dict, runs) -> None:
    """Rows of servers this run did not start, from an earlier run's printed JSON lines."""
    earlier: dict = {}
    for line in args.earlier_rows.read_text().splitlines():
        if line.startswith("{") and '"server"' in line:
            row = json.loads(line)
            earlier.setdefault(row.pop("server"), {})[row.pop("workload")] = row
    for name, rows in earlier.items():
        if name in servers:
            continue
        servers[name] = {"command": "an earlier run: " + str(args.earlier_rows), "runs": {},
                         "note": "measured by an earlier run of this script on the same kind of machine, same requests"}
        for wname, c, _ in runs:
            if wname in rows:
                servers[name]["runs"][wname] = rows[wname]
            elif name == "ollama_defaults" and c > args.one_slot_max_concurrency:
                servers[name]["runs"][wname] = {"skipped": "one slot serves one request at a time: its "
                                                           "throughput is the W4_c1 figure"}


# ---------------------------------------------------------------- main

def tokenizer_size(folder: str | None) -> int | None:
    """Tokens in an HF folder's tokenizer.json (added tokens included), None without one."""
    path = Path(folder or "") / "tokenizer.json"
    if not folder or not path.is_file():
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("pack-llamacpp", "export-tokenizer", "make-checkpoint"):
        return llamacpp_prep.main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", required=True, help="path to the llama-server binary")
    p.add_argument("--gguf", required=True, help="GGUF file both servers load ('smollm2': the bundled one)")
    p.add_argument("--pagefleet-model", help="what pagefleet loads instead (the HF folder the GGUF came from)")
    p.add_argument("--pagefleet-quantization", choices=("gguf",),
                   help="keep the GGUF's weights quantised (default: dequantised on load)")
    p.add_argument("--pagefleet-arg", action="append", default=[], help="extra `replica serve` argument")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--concurrency", type=_ints, help="W4 concurrencies (default 1,8,32,128 on cuda; 1,16 on cpu)")
    p.add_argument("--num-requests", type=_ints, help="requests per W4 concurrency (default 2 x c, at least 8)")
    p.add_argument("--w2-requests", type=int, default=3, help="W2 requests, one after the other")
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--one-slot-max-concurrency", type=int, default=8)
    p.add_argument("--slot-ctx", type=int, default=1600, help="context per llama.cpp slot (longest request: 1536)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (-t, -tb; CPU)")
    p.add_argument("--vocab-size", type=int, help="prompt ids are drawn below this (default: the GGUF's vocabulary)")
    p.add_argument("--llama-source", default="",
                   help="where the llama.cpp source came from, for the results (an sdist version, a commit)")
    p.add_argument("--earlier-rows", type=Path,
                   help="JSON lines this script printed in an earlier run on the same machine and requests "
                        "({'server': ..., 'workload': ...}): servers not run now take their rows from it")
    p.add_argument("--tag", default="", help="added to the result file name")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.gguf == "smollm2":
        from replica.models.registry import resolve_model_path
        args.gguf = resolve_model_path("smollm2")
    args.gguf = Path(args.gguf)
    is_cuda = args.device.startswith("cuda")
    args.concurrency = args.concurrency or ([1, 8, 32, 128] if is_cuda else [1, 16])
    args.num_requests = args.num_requests or [max(8, 2 * c) for c in args.concurrency]
    if len(args.num_requests) != len(args.concurrency):
        p.error("--num-requests needs one count per --concurrency value")
    if args.threads is None and not is_cuda:
        args.threads = os.cpu_count()
    facts = gguf_facts(args.gguf)
    # Prompt ids every server accepts: a GGUF converted from a folder may pad its vocabulary past
    # the tokenizer ([PAD] tokens), and pagefleet rejects ids its tokenizer does not know.
    args.vocab_size = args.vocab_size or min(v for v in (facts.get("vocab_size") or 32000,
                                                          tokenizer_size(args.pagefleet_model)) if v)
    import torch
    model_name = args.gguf.stem
    uses_llama = args.servers != "pagefleet"
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=args.device, device_name=device_name(args.device), cpu_count=os.cpu_count(),
               load_avg_start=load_average(), torch=torch.__version__, python=platform.python_version(),
               pagefleet_commit=git_commit(),
               llama_server_version=llama_server_version(args.llama_server) if uses_llama else None,
               llama_build_flags=llama_build_flags(args.llama_server) if uses_llama else None,
               llama_source=args.llama_source, model_name=model_name,
               gguf=str(args.gguf), gguf_facts=facts, pagefleet_model=str(args.pagefleet_model or args.gguf),
               pagefleet_weights=("GGUF kept quantised (--quantization gguf)" if args.pagefleet_quantization
                                  else "HF folder, model dtype" if args.pagefleet_model
                                  else "GGUF dequantised on load to the model dtype"),
               llama_threads=args.threads, slot_ctx=args.slot_ctx,
               workloads=dict(W2=f"{args.w2_requests} x {W2_PROMPT_LEN} in / {W2_OUTPUT_LEN} out, one stream",
                              W4=f"prompts {W4_PROMPT_LEN}, outputs {W4_OUTPUT_LEN}, requests "
                                 f"{dict(zip(args.concurrency, args.num_requests))} at concurrency"))
    print(json.dumps(env), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="vs-llamacpp-logs-"))     # each server's output, for failures
    runs = workloads(args)
    names = args.servers.split(",")
    for name in names:
        if name not in SERVERS:
            p.error(f"--servers: {name!r} is not one of {', '.join(SERVERS)}")
    servers, failed = {}, []
    for name in names:
        servers[name] = {"runs": {}}
        try:
            bench_server(args, name, runs, log_dir, servers[name])
        except Exception as err:    # the other servers' rows are still worth writing down
            print(f"[{name}] failed: {err}", flush=True)
            servers[name]["error"] = str(err)[-3000:]
            failed.append(name)
    if args.earlier_rows:
        merge_earlier_rows(args, servers, runs)
    env["load_avg_end"] = load_average()
    results = {"env": env, "workloads": [w for w, _, _ in runs], "servers": servers, "ratios": ratios(servers)}
    dev = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"] if is_cuda else "cpu").strip("-")
    stem = f"vs-llamacpp-{dev}-{model_name}{'-' + args.tag if args.tag else ''}-{datetime.date.today()}"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    write_png(out_dir / f"{stem}.png", results)
    print_table(results)
    print(f"wrote {out_dir / stem}.json and .png")
    bad = [(s, w) for s, d in servers.items() for w, r in d["runs"].items() if r.get("num_errors")]
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
