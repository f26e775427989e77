"""The soak of issue 18 on a GPU: one replica per GPU (`--load-format dummy` weights of the
model's shape) behind NGINX from fleetctl's template with TLS, then bench/soak.py's load: mixed
streaming and non-streaming W4-length completions at `--concurrency` for `--duration-s`,
sampling each replica's RSS and GPU memory. Exit 0 when the soak passed (0 errors, RSS drift
<= 2% after warm-up, 0 running and KV free at the end).

    python3 bench/soak_gpu.py --model DIR --load-format dummy --num-gpus 1 --duration-s 600 --concurrency 64

Replicas get fleetctl's malloc settings (`malloc_env`); `MALLOC_ARENA_MAX=64 python3 ...`
runs them with glibc's usual arena count instead, for comparison.
Writes bench/results/soak-<gpu>-<date>.json (or under $OUT). DIR needs config.json (and the
tokenizer files when --vocab-size is left at the tokenizer's size).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.nginx_overhead import wait_ready  # noqa: E402
from bench.soak import Target, _range, soak  # noqa: E402
from fleetctl.backends.base import malloc_env  # noqa: E402
from fleetctl.config import FleetConfig  # noqa: E402
from fleetctl.nginx import Nginx, Upstream, render, site_context  # noqa: E402
from fleetctl.tls import ensure_tls  # noqa: E402

FIRST_REPLICA_PORT, HTTPS_PORT, HTTP_PORT, INTERNAL_PORT = 8000, 8443, 8080, 8081


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--num-gpus", type=int, default=1, help="replicas, one per GPU (0, 1, ...)")
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--prompt-len", default="64:1024", help="LOW:HIGH tokens (W4's by default)")
    parser.add_argument("--output-len", default="16:512", help="LOW:HIGH tokens (W4's by default)")
    parser.add_argument("--device", default="cuda", help="cpu: try the script itself on a CPU machine")
    parser.add_argument("--nginx", default="nginx", help="the nginx binary")
    parser.add_argument("--replica-args", default="", help="extra `replica serve` arguments")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    replicas = {}
    for gpu in range(args.num_gpus):
        port = FIRST_REPLICA_PORT + gpu
        replicas[f"r{gpu + 1}"] = (port, subprocess.Popen(
            [sys.executable, "-m", "replica.cli", "serve", "--model", args.model, "--port", str(port),
             "--device", args.device, "--load-format", args.load_format, "--served-model-name", "bench",
             "--max-queue", "100000", *args.replica_args.split()],
            cwd=ROOT, env={**os.environ, **malloc_env(), "CUDA_VISIBLE_DEVICES": str(gpu)},
            stdout=open(work / f"r{gpu + 1}.log", "w"), stderr=subprocess.STDOUT))
    nginx = Nginx(work / "nginx", binary=args.nginx)
    try:
        for port, proc in replicas.values():
            wait_ready(f"http://127.0.0.1:{port}", 900, proc)
        tls = ensure_tls(work / "tls", ["localhost", "127.0.0.1"])
        config = FleetConfig(https_port=HTTPS_PORT, http_port=HTTP_PORT, internal_port=INTERNAL_PORT,
                             served_model_name="bench", rate_limit_per_s=1e6, rate_limit_burst=1000000)
        nginx.apply(render(site_context(config, "soak", [Upstream(rid, f"127.0.0.1:{port}")
                                                         for rid, (port, _) in replicas.items()], tls, nginx.prefix)))
        target = Target(f"https://127.0.0.1:{HTTPS_PORT}", str(tls.ca), None, "bench",
                        {rid: f"http://127.0.0.1:{port}/metrics" for rid, (port, _) in replicas.items()},
                        {rid: proc.pid for rid, (_, proc) in replicas.items()},
                        {f"r{gpu + 1}": gpu for gpu in range(args.num_gpus)} if args.device == "cuda" else {})
        report = soak(target, args.duration_s, args.concurrency, _range(args.prompt_len), _range(args.output_len),
                      args.vocab_size, sample_every_s=min(10.0, args.duration_s / 20))
    finally:
        nginx.stop()
        for _, proc in replicas.values():
            proc.terminate()
            proc.wait(timeout=60)
    import torch

    document = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "num_gpus": args.num_gpus, "model": args.model, "date": datetime.date.today().isoformat(),
                **report.to_json()}
    out = Path(args.out) / f"soak-{document['gpu'].replace(' ', '-')}-{document['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1))
    print(json.dumps({k: v for k, v in document.items() if k != "samples"}, indent=1))
    print(f"wrote {out}")
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
