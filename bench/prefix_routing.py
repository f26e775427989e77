"""W6 (WORKLOADS.md): the fleet's prefix-cache hit rate, requests/s and TTFT under each NGINX
routing mode (least_conn, session, prefix), the same requests in each.

    python3 bench/prefix_routing.py --model DIR [--load-format dummy] --gpus 0,1,2,3
    # one GPU, four replicas sharing it:
    python3 bench/prefix_routing.py --model DIR --load-format dummy --gpus 0,0,0,0 --gpu-memory-utilization 0.2

Starts one `replica serve` per entry of --gpus (CUDA_VISIBLE_DEVICES) on 127.0.0.1:9001.., puts
NGINX with fleetctl's own template and TLS in front (https://127.0.0.1:8443), and for each mode
reloads NGINX and sends W6: 16 shared prefixes of 1024 random token ids, each request one of them
at random plus 64 unique tokens, 64 output tokens (ignore_eos), 2000 requests, concurrency 64
per replica. Each mode gets prefixes of its own (nothing cached from the mode before). The hit
rate comes from the replicas' /metrics (pagefleet_prefix_cache_{hits,queries}_total, tokens).
Prints a table and writes bench/results/prefix-routing-<gpu>-<date>.json (or under $OUT).
--device cpu with a tiny model and small numbers checks the script itself.
"""
import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import random
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from bench.nginx_overhead import wait_ready  # noqa: E402
from bench.served import git_commit  # noqa: E402
from fleetctl.config import FleetConfig  # noqa: E402
from fleetctl.nginx import Nginx, Upstream, render, site_context  # noqa: E402
from fleetctl.tls import ensure_tls  # noqa: E402

HTTPS_PORT, FIRST_REPLICA_PORT = 8443, 9001
MODES = ("least_conn", "session", "prefix")


def scrape_replicas(urls: list[str]) -> list[dict[str, float]]:
    """Per replica: prefix-cache hits and queries (tokens) and requests finished, from /metrics."""
    names = {"pagefleet_prefix_cache_hits_total": "hits", "pagefleet_prefix_cache_queries_total": "queries",
             "pagefleet_request_success_total": "requests"}
    found = []
    for url in urls:
        counts = dict.fromkeys(names.values(), 0.0)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in names:
                    counts[names[name]] += float(line.rsplit(" ", 1)[1])
        found.append(counts)
    return found


def replica_deltas(before: list[dict], after: list[dict]) -> list[dict]:
    """What each replica did during one mode: requests, their share, its own prefix-cache hit rate."""
    deltas = [{k: a[k] - b[k] for k in a} for b, a in zip(before, after)]
    total = sum(d["requests"] for d in deltas) or 1.0
    return [{"requests": int(d["requests"]), "share": round(d["requests"] / total, 3),
             "hit_rate": round(d["hits"] / max(1.0, d["queries"]), 3)} for d in deltas]


def w6_requests(args, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, args.vocab_size) for _ in range(args.prefix_len)] for _ in range(args.num_prefixes)]
    return [rng.choice(prefixes) + [rng.randrange(3, args.vocab_size) for _ in range(args.suffix_len)]
            for _ in range(args.num_requests)]


async def run_load(url: str, model: str, prompts: list[list[int]], concurrency: int, output_len: int,
                   ctx: ssl.SSLContext) -> dict:
    """Streams every request (TTFT: send → first token chunk); returns throughput and TTFT."""
    ttfts, errors = [], 0
    queue = list(enumerate(prompts))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while queue:
            index, prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
                    "stream": True, "temperature": 0, "user": f"session-{index % 64}"}
            sent = time.perf_counter()
            first = None
            try:
                async with session.post(url + "/v1/completions", json=body) as response:
                    if response.status != 200:
                        errors += 1
                        continue
                    async for line in response.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.perf_counter() - sent
            except aiohttp.ClientError:
                errors += 1
                continue
            if first is not None:
                ttfts.append(first)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ttft_ms = np.array(ttfts) * 1000 if ttfts else np.array([float("nan")])
    return {"requests_per_s": len(ttfts) / elapsed, "num_errors": errors, "duration_s": elapsed,
            "ttft_p50_ms": float(np.percentile(ttft_ms, 50)), "ttft_p99_ms": float(np.percentile(ttft_ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", default="0,1,2,3", help="one replica per entry (repeat an index to share a GPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-prefixes", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--concurrency-per-replica", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--prefix-chars", type=int, default=1024,
                        help="prefix routing's key: 1024 characters = the first 256 token ids of a prompt")
    parser.add_argument("--prefix-max-conns", type=int,
                        help="prefix routing's load bound per replica (default: 1.25 x --concurrency-per-replica; "
                             "below the offered load, the excess spills to least_conn without affinity)")
    parser.add_argument("--extra", default="", help="more `replica serve` arguments, e.g. '--max-model-len 2048'")
    args = parser.parse_args()

    gpus = args.gpus.split(",")
    prefix_max_conns = args.prefix_max_conns = args.prefix_max_conns or -(-5 * args.concurrency_per_replica // 4)
    work = Path(tempfile.mkdtemp(prefix="pagefleet-w6-"))
    os.chmod(work, 0o755)  # NGINX's workers (nobody, under root) reach its temp dirs
    procs, urls = [], []
    try:
        for index, gpu in enumerate(gpus):
            port = FIRST_REPLICA_PORT + index
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            argv = [sys.executable, "-m", "replica.cli", "serve", "--model", args.model, "--port", str(port),
                    "--served-model-name", "w6", "--device", args.device, "--load-format", args.load_format,
                    *(["--gpu-memory-utilization", str(args.gpu_memory_utilization)] if args.device == "cuda" else []),
                    *args.extra.split()]
            log = open(work / f"replica-{index}.log", "w")
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs):
            wait_ready(url, 1800, proc)
        tls = ensure_tls(work / "tls", ["127.0.0.1"])
        nginx = Nginx(work / "nginx")
        upstreams = [Upstream(f"r{i + 1}", url.removeprefix("http://")) for i, url in enumerate(urls)]
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        results = {}
        for seed, mode in enumerate(args.modes.split(","), start=1):
            config = FleetConfig(routing=mode, served_model_name="w6", https_port=HTTPS_PORT, rate_limit_per_s=1e6,
                                 rate_limit_burst=100000, prefix_key_chars=args.prefix_chars,
                                 prefix_max_conns=prefix_max_conns)
            nginx.apply(render(site_context(config, "w6", upstreams, tls, nginx.prefix)))
            before = scrape_replicas(urls)
            summary = asyncio.run(run_load(f"https://127.0.0.1:{HTTPS_PORT}", "w6", w6_requests(args, seed),
                                           args.concurrency_per_replica * len(urls), args.output_len, ctx))
            after = scrape_replicas(urls)
            summary["prefix_cache_hit_rate"] = ((sum(a["hits"] for a in after) - sum(b["hits"] for b in before))
                                                / max(1.0, sum(a["queries"] for a in after)
                                                      - sum(b["queries"] for b in before)))
            summary["replicas"] = replica_deltas(before, after)
            results[mode] = summary
            print(f"{mode:>10}: hit rate {summary['prefix_cache_hit_rate']:.3f}  {summary['requests_per_s']:.2f} req/s  "
                  f"TTFT p50 {summary['ttft_p50_ms']:.0f} ms  p99 {summary['ttft_p99_ms']:.0f} ms  "
                  f"errors {summary['num_errors']}  requests per replica "
                  f"{[r['requests'] for r in summary['replicas']]}", flush=True)
        nginx.stop()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    gpu_name = "cpu"
    if args.device == "cuda":
        gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True).stdout.splitlines()[0].replace("NVIDIA ", "").replace(" ", "-")
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"prefix-routing-{gpu_name}-{datetime.date.today()}.json"
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    env = {"gpu": gpu_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "pagefleet_commit": git_commit(), "torch": importlib.metadata.version("torch"), "nginx": nginx_version}
    path.write_text(json.dumps({"workload": "W6", "env": env, "args": vars(args), "results": results}, indent=2)
                    + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
