"""One replica directly vs the same replica behind NGINX with TLS, at several concurrencies.

    python3 bench/nginx_overhead.py --model DIR [--load-format dummy] [--levels 1:20,32:200,128:500]

Starts `replica serve` on 127.0.0.1:8000, puts NGINX in front of it with fleetctl's own template and
TLS (https://127.0.0.1:8443, verified against the generated CA), then runs the load generator
(W4's length distribution: prompts 64-1024, outputs 16-512 tokens, random token ids, exact output
lengths) for each concurrency against both URLs. Prints a table and writes
bench/results/nginx-overhead-<gpu>-<date>.json (or under $OUT).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetctl.config import FleetConfig  # noqa: E402
from fleetctl.nginx import Nginx, Upstream, render, site_context  # noqa: E402
from fleetctl.tls import ensure_tls  # noqa: E402

REPLICA_PORT, HTTPS_PORT = 8000, 8443


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the replica exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def load(base_url: str, concurrency: int, num_requests: int, vocab: int, ca: Path | None, out: Path) -> dict:
    argv = ["--base-url", base_url, "--workload", "W4", "--num-requests", str(num_requests),
            "--concurrency", str(concurrency), "--vocab-size", str(vocab), "--seed", "0",
            "--out", str(out), "--json"]
    if ca is not None:
        argv += ["--ca-file", str(ca)]
    code = ("import sys; from fleetctl.bench_cli import main; sys.exit(main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL, timeout=1800)
    return json.loads(out.read_text())["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--levels", default="1:20,32:200,128:500", help="concurrency:requests,...")
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--nginx", default="nginx", help="the nginx binary")
    parser.add_argument("--replica-args", default="", help="extra `replica serve` arguments")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nginx-overhead-"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(work / "replica.log", "w")
    replica = subprocess.Popen(
        [sys.executable, "-m", "replica.cli", "serve", "--model", args.model, "--port", str(REPLICA_PORT),
         "--load-format", args.load_format, "--served-model-name", "bench", "--max-queue", "100000",
         *args.replica_args.split()], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    nginx = Nginx(work / "nginx", binary=args.nginx)
    try:
        direct = f"http://127.0.0.1:{REPLICA_PORT}"
        wait_ready(direct, 900, replica)
        tls = ensure_tls(work / "tls", ["localhost", "127.0.0.1"])
        config = FleetConfig(https_port=HTTPS_PORT, http_port=8080, internal_port=8081,
                             rate_limit_per_s=1e6, rate_limit_burst=1000000)
        nginx.prepare()
        nginx.apply(render(site_context(config, "bench", [Upstream("r1", f"127.0.0.1:{REPLICA_PORT}")],
                                        tls, nginx.prefix)))
        via_nginx = f"https://127.0.0.1:{HTTPS_PORT}"
        import torch
        results = {"env": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "python": platform.python_version(),
                           "nginx": subprocess.run([args.nginx, "-v"], capture_output=True, text=True).stderr.strip(),
                           "date": datetime.date.today().isoformat(), "model": args.model,
                           "workload": "W4 lengths: prompts 64-1024, outputs 16-512"},
                   "levels": []}
        # Warm-up, measured nowhere: the first requests of a fresh replica compile kernels for new
        # shapes, and whichever path ran first would pay for it.
        for name, url, ca in (("warmup-direct", direct, None), ("warmup-nginx", via_nginx, tls.ca)):
            load(url, 32, 64, args.vocab_size, ca, work / f"{name}.json")
        for level in args.levels.split(","):
            concurrency, num_requests = (int(x) for x in level.split(":"))
            row = {"concurrency": concurrency, "num_requests": num_requests}
            for name, url, ca in (("direct", direct, None), ("nginx_tls", via_nginx, tls.ca)):
                row[name] = load(url, concurrency, num_requests, args.vocab_size, ca,
                                 work / f"{name}-{concurrency}.json")
            row["nginx_throughput_share"] = (row["nginx_tls"]["output_tokens_per_s"]
                                             / row["direct"]["output_tokens_per_s"])
            results["levels"].append(row)
            print(json.dumps({"concurrency": concurrency, "share": round(row["nginx_throughput_share"], 3)}),
                  flush=True)
    finally:
        nginx.stop()
        replica.terminate()
        replica.wait(timeout=60)
    print(f"\n{'conc':>5} {'path':<10} {'req/s':>7} {'out tok/s':>10} {'TTFT p50/p99 ms':>17} "
          f"{'ITL p50/p99 ms':>16} {'errors':>7}")
    for row in results["levels"]:
        for name in ("direct", "nginx_tls"):
            s = row[name]
            print(f"{row['concurrency']:>5} {name:<10} {s['requests_per_s']:>7.2f} {s['output_tokens_per_s']:>10.1f} "
                  f"{s['ttft_ms']['p50']:>8.1f}/{s['ttft_ms']['p99']:<8.1f} {s['itl_ms']['p50']:>7.1f}/"
                  f"{s['itl_ms']['p99']:<8.1f} {s['num_errors']:>7}")
        print(f"{'':>5} NGINX/direct output tokens/s: {row['nginx_throughput_share']:.3f}")
    gpu = results["env"]["gpu"].replace(" ", "-")
    path = out_dir / f"nginx-overhead-{gpu}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
