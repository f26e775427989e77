"""Issue 18 item 2: the fleet on several GPUs, through fleetctl (local backend: one replica process
per GPU, NGINX with TLS in front), in one command. Three parts (`--parts scale,update,kill`):

  scale   for N in --replicas-list (capped at the GPUs present): `fleetctl up` N replicas (then
          `fleetctl scale N` for the next N), one per GPU, a warm-up of 256 requests a replica at
          full concurrency, then W4 through NGINX with TLS (prompts 64-1024, outputs 16-512 random
          token ids, exact lengths) at 128 x N in flight, 1,024 x N requests: requests/s, output
          tok/s, TTFT and ITL p50/p99, scaling efficiency = req/s at N / (N x req/s at 1), target
          >= 0.95.
  update  the largest N up, W4 load at 64 x N running: `fleetctl update --max-unavailable 1
          --max-surge 0 --model DIR2` (DIR2: --update-model, else a folder of links to --model's
          files, which fleetctl counts as other weights); its seconds, and the load's requests ok,
          failed after NGINX accepted them, and re-sent because they never reached NGINX. Target 0 failed.
  kill    N up, `fleetctl watch` running, streaming W4 load at 64 x N: kill -9 every process of one
          replica (server and engine core) mid-stream. How the streams open at the kill ended
          (ok / error event or closed connection / hung past --stream-deadline-s), errors of the
          requests sent after the kill (target 0; see bench/fleet_gpus_kill.py for the instant
          right after it), and seconds until the watcher has N replicas ready and in NGINX again.
          NGINX's access log says how many requests the dead replica held.

Prints a table; writes bench/results/fleet-gpus-<gpu>-x<N>[-<parts>]-<date>.json (or under $OUT,
or --out): GPU names, versions, date, the exact command, every figure; and its .png
(`bench/fleet_gpus_plot.py`, where matplotlib is installed). Exit 0 once the parts ran (the
figures say whether the targets were met); the fleet is always taken down at the end.

GPU (the image lacks NGINX and some wheels). Here, once (.carry/ and .whl/ are git-ignored):
    mkdir -p .carry/debs && cp /var/cache/apt/archives/nginx_1.22.1-9+deb12u11_amd64.deb \\
        /var/cache/apt/archives/nginx-common_1.22.1-9+deb12u11_all.deb .carry/debs/
    ls .carry/tokenizer || python bench/vs_llamacpp.py export-tokenizer .carry/tokenizer
    ls .whl   # pydantic(+core, annotated_types, typing_*), cryptography(+cffi, pycparser), msgspec, pyzmq

Device, 2 H200s: run(kind="nvidia-h200-x2", carry=[".carry/debs", ".carry/tokenizer", ".whl"], command=
  SETUP; python3 bench/fleet_gpus.py --model /tmp/ck8b --set load_format=dummy --replicas-list 1,2 --out $OUT)
where SETUP (idempotent, so every call may start with it; the machine's NCCL settings, e.g.
NCCL_NVLS_ENABLE=0, stay as they are: replicas are independent processes and use no NCCL) is
    set -e; for d in .carry/debs/*.deb; do dpkg -x $d /tmp/ngx; done; export PATH=/tmp/ngx/usr/sbin:$PATH;
    python3 -m pip install -q --no-index --find-links .whl pydantic cryptography msgspec pyzmq;
    test -f /tmp/ck8b/config.json || python3 bench/vs_llamacpp.py make-checkpoint /tmp/ck8b --tokenizer .carry/tokenizer

Device, 4 H200s: kind="nvidia-h200-x4", the same carry, two calls of at most 10 minutes each
(scale ~4 min, update + kill ~4 min; each writes its own JSON):
    SETUP; python3 bench/fleet_gpus.py --model /tmp/ck8b --set load_format=dummy --replicas-list 1,2,4 --parts scale --out $OUT
    SETUP; python3 bench/fleet_gpus.py --model /tmp/ck8b --set load_format=dummy --replicas-list 4 --parts update,kill --out $OUT
With load_format=dummy the replicas read only config.json and the tokenizer of /tmp/ck8b (random
weights of its shape); drop it to load the checkpoint's own weights.

CPU check of the script itself (tests/fleet/test_fleet_gpus.py runs it this way, tiny model):
    python bench/fleet_gpus.py --model DIR --device cpu --replicas-list 1,2 --concurrency-per-replica 4 \\
        --prompt-len 16:64 --output-len 4:16 --set num_kv_blocks=64 --set max_model_len=256
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fleet_gpus_fleet import GROUP, ClosedLoop, Fleet, tally  # noqa: E402
from bench.fleet_gpus_kill import kill_part  # noqa: E402
from bench.fleet_gpus_plot import plot  # noqa: E402
from fleetctl.loadgen import BenchConfig, make_requests, run_benchmark  # noqa: E402
from fleetctl.loadgen_report import finite_json, summarize  # noqa: E402

PARTS = ("scale", "update", "kill")


def scale_part(fleet: Fleet, args, save=lambda result: None) -> dict:
    """One row per N; `save(result so far)` after each, so a later N that fails keeps the earlier."""
    rows = []
    for n in args.replicas_list:
        up_s = fleet.up(n)
        concurrency = args.concurrency_per_replica * n
        config = BenchConfig(fleet.url, GROUP, concurrency=concurrency, ca_file=fleet.ca_file,
                             timeout_s=args.stream_deadline_s, seed=args.seed)
        if args.warmup_requests_per_replica:  # first batches on each replica: graphs, allocator, caches
            asyncio.run(run_benchmark(config, make_requests(args.warmup_requests_per_replica * n, args.prompt_len,
                                                            args.output_len, vocab_size=args.vocab_size, seed=99)))
        num_requests = args.num_requests or n * args.num_requests_per_replica
        requests = make_requests(num_requests, args.prompt_len, args.output_len,
                                 vocab_size=args.vocab_size, seed=args.seed)
        s = summarize(asyncio.run(run_benchmark(config, requests)))
        rows.append({"num_replicas": n, "concurrency": concurrency, "up_s": round(up_s, 1),
                     "num_requests": s["num_requests"], "num_ok": s["num_ok"], "num_errors": s["num_errors"],
                     "errors_by_status": s["errors_by_status"], "num_resent_unsent": s["num_unsent_retries"],
                     "num_short_outputs": s["num_short_outputs"], "duration_s": s["duration_s"],
                     "requests_per_s": s["requests_per_s"], "output_tokens_per_s": s["output_tokens_per_s"],
                     "ttft_ms_p50": s["ttft_ms"]["p50"], "ttft_ms_p99": s["ttft_ms"]["p99"],
                     "itl_ms_p50": s["itl_ms"]["p50"], "itl_ms_p99": s["itl_ms"]["p99"]})
        print(f"scale: {n} replica(s): {s['requests_per_s']:.2f} req/s, {s['num_errors']} errors", flush=True)
        one = next((r["requests_per_s"] for r in rows if r["num_replicas"] == 1), None)
        for row in rows:
            row["scaling_efficiency"] = row["requests_per_s"] / (row["num_replicas"] * one) if one else None
        save({"rows": rows, "target_efficiency": 0.95})
    return {"rows": rows, "target_efficiency": 0.95}


def update_target(model: str, work: Path) -> str:
    """A folder of symbolic links to the model's files: the same weights under another path,
    which `fleetctl update` accepts as new weights (it refuses a fleet already serving the target)."""
    source = Path(model).resolve()
    target = work / f"{source.name}-update"
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).symlink_to(item)
    return str(target)


def update_part(fleet: Fleet, args, n: int, work: Path) -> dict:
    fleet.up(n)
    target = args.update_model or update_target(args.model, work)
    config = BenchConfig(fleet.url, GROUP, ca_file=fleet.ca_file, timeout_s=args.stream_deadline_s)
    load = ClosedLoop(config, args.update_concurrency_per_replica * n, args.prompt_len, args.output_len,
                      args.vocab_size, args.stream_deadline_s)
    command = ["update", "--model", target, "--max-surge", "0", "--max-unavailable", "1", "--group", GROUP]

    async def go() -> tuple[int, str, float]:
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(stop))
        await asyncio.sleep(args.settle_s)  # the load is at full concurrency before the first swap
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "fleetctl", *command, env=fleet.env,
                                                    cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        output, _ = await proc.communicate()
        duration_s = time.monotonic() - started
        await asyncio.sleep(args.settle_s)  # and goes on against the new replicas
        stop.set()
        await task
        return proc.returncode, output.decode(errors="replace"), duration_s

    returncode, output, duration_s = asyncio.run(go())
    status = fleet.status()
    print(f"update: exit {returncode} in {duration_s:.1f} s; load {tally(load.results)['num_failed']} failed",
          flush=True)
    return {"command": "fleetctl " + shlex.join(command), "num_replicas": n, "exit_code": returncode,
            "duration_s": duration_s, "output_tail": output[-1500:],
            "concurrency": args.update_concurrency_per_replica * n, "load": tally(load.results),
            "num_replicas_ready_after": status["num_replicas_ready"],
            "all_on_target": all(r["weights"] == str(Path(target).resolve()) for r in status["replicas"])}


def facts(args) -> dict:
    def out(*cmd: str) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
            return (done.stdout + done.stderr).strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    gpus = [g for g in out("nvidia-smi", "--query-gpu=name", "--format=csv,noheader").splitlines() if g.strip()] \
        if args.device == "cuda" else []
    versions = {"python": platform.python_version(), "nginx": out("nginx", "-v"),
                "fleetctl": out(sys.executable, "-m", "fleetctl", "--version"),
                "driver": out("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").split("\n")[0]}
    for package in ("torch", "triton", "transformers", "aiohttp"):
        try:
            from importlib.metadata import version
            versions[package] = version(package)
        except Exception:   # not installed: say so rather than fail the run
            versions[package] = None
    return {"gpus": gpus, "gpu": gpus[0] if gpus else "cpu", "versions": versions,
            "commit": out("git", "rev-parse", "HEAD") or None, "host_cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def model_vocab(model: str) -> int:
    """Prompt ids the replica accepts: below the config's vocab_size and the tokenizer's size
    (a checkpoint may pad its vocabulary past its tokenizer)."""
    folder = Path(model)
    config = json.loads((folder / "config.json").read_text())
    sizes = [config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 32000]
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        sizes.append(Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True))
    return min(sizes)


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))  # the table stays whole in logs and pipes
    if "scale" in doc:
        table = Table(title=f"W4 through NGINX + TLS, {doc['gpu']}")
        for name in ("replicas", "concurrency", "ok/sent", "req/s", "output tok/s", "TTFT p50/p99 ms",
                     "ITL p50/p99 ms", "efficiency", "up s"):
            table.add_column(name, justify="right")
        for r in doc["scale"]["rows"]:
            fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
            table.add_row(str(r["num_replicas"]), str(r["concurrency"]), f"{r['num_ok']}/{r['num_requests']}",
                          fmt(r["requests_per_s"], ".2f"), fmt(r["output_tokens_per_s"], ",.0f"),
                          f"{fmt(r['ttft_ms_p50'])} / {fmt(r['ttft_ms_p99'])}",
                          f"{fmt(r['itl_ms_p50'])} / {fmt(r['itl_ms_p99'])}", fmt(r["scaling_efficiency"], ".3f"),
                          fmt(r["up_s"]))
        console.print(table)
    if "update" in doc:
        u, load = doc["update"], doc["update"]["load"]
        console.print(f"update of {u['num_replicas']} (exit {u['exit_code']}) in {u['duration_s']:.1f} s under "
                      f"{u['concurrency']} in flight: {load['num_ok']} ok, {load['num_failed']} failed after NGINX "
                      f"accepted them {load['failed_by_status'] or ''}".rstrip()
                      + f", {load['num_resent_unsent']} re-sent "
                      f"(never reached NGINX), {load['num_unsent']} lost")
    if "kill" in doc:
        k = doc["kill"]
        console.print(f"kill -9 of {k['victim']} ({len(k['pids_killed'])} processes) with {k['num_replicas']} up: "
                      f"open streams {k['open_at_kill']['num_ok']} ok, {k['open_at_kill']['num_failed']} ended with "
                      f"an error {k['open_at_kill']['failed_by_status'] or ''}".rstrip()
                      + f", {k['num_hung']} hung; NGINX log: "
                      f"{k['num_on_victim_per_nginx_log']} on the victim; after the kill "
                      f"{k['after_kill']['num_ok']} ok, {k['after_kill']['num_failed']} failed "
                      f"({k['after_left_nginx']['num_failed']} once it was out of NGINX); "
                      f"back to {k['num_replicas']} ready in NGINX after {k['recovered_after_s']} s")


def parse_args(argv=None):
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    span = lambda text: tuple(int(x) for x in (text.split(":") * 2)[:2])  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF checkpoint folder (config.json, tokenizer; weights unless load_format=dummy)")
    p.add_argument("--update-model", help="what `update` moves to (default: links to --model's files)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--replicas-list", type=ints, default=[1, 2, 4], help="capped at the GPUs present")
    p.add_argument("--concurrency-per-replica", type=int, default=128)
    p.add_argument("--update-concurrency-per-replica", type=int, default=64)
    p.add_argument("--kill-concurrency-per-replica", type=int, default=64)
    p.add_argument("--num-requests", type=int, help="measured per scale step, in all")
    p.add_argument("--num-requests-per-replica", type=int, default=1024,
                   help="measured per scale step, times its N (--num-requests: a total instead)")
    p.add_argument("--warmup-requests-per-replica", type=int, default=256,
                   help="sent at the step's full concurrency before it is measured (default: two bursts of 128)")
    p.add_argument("--prompt-len", type=span, default=(64, 1024), metavar="LOW:HIGH")
    p.add_argument("--output-len", type=span, default=(16, 512), metavar="LOW:HIGH")
    p.add_argument("--vocab-size", type=int, help="prompt ids below this (default: the model's and tokenizer's)")
    p.add_argument("--set", "--replica-setting", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting of every replica (fleetctl --group's: load_format=dummy, "
                        "gpu_memory_utilization=0.9, max_num_seqs=256, ...); repeat")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--settle-s", type=float, default=5.0, help="load before and after the update")
    p.add_argument("--kill-after-s", type=float, default=5.0, help="streaming load before the kill")
    p.add_argument("--after-recovery-s", type=float, default=10.0, help="load on once the fleet is whole again")
    p.add_argument("--stream-deadline-s", type=float, default=300.0, help="a request open longer is hung")
    p.add_argument("--watch-arg", action="append", default=[], help="e.g. --watch-arg=--interval=1; repeat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="where the fleet's state dir and logs go (default: the system's temp dir)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results"),
                   help="folder of the JSON (default $OUT, else bench/results)")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.vocab_size = args.vocab_size or model_vocab(args.model)
    gpus = []
    if args.device == "cuda":
        from fleetctl.gpus import list_gpus
        present = list_gpus()
        args.replicas_list = [n for n in args.replicas_list if n <= len(present)] or [len(present)]
        gpus = present[:max(args.replicas_list)]
    n_max = max(args.replicas_list)
    doc = {**facts(args), "command": shlex.join([sys.executable, *sys.argv]) if argv is None
           else shlex.join(["bench/fleet_gpus.py", *argv]), "model": str(Path(args.model).resolve()),
           "settings": args.settings, "workload": {"prompt_len": args.prompt_len, "output_len": args.output_len,
                                                   "vocab_size": args.vocab_size}}
    work = Path(tempfile.mkdtemp(prefix="fleet-gpus-", dir=args.work_dir))
    fleet = Fleet(work / "home", args.model, args.device, gpus, args.settings, args.ready_timeout)
    doc["state_dir"] = str(fleet.home)  # its logs stay there (fleetctl logs, with PAGEFLEET_HOME set)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = "" if len(args.parts) == len(PARTS) else "-" + "-".join(args.parts)
    path = args.out / (f"fleet-gpus-{re.sub(r'[^A-Za-z0-9.-]+', '-', doc['gpu'])}-x{n_max}{parts}-"
                       f"{doc['date'][:10]}.json")

    def save(part: str, result: dict) -> None:
        """Written after each part (and each N of scale): what is done survives a later step that
        fails or runs past the machine's time limit."""
        doc[part] = result
        path.write_text(json.dumps(finite_json(doc), indent=1) + "\n")

    steps = {"scale": lambda: scale_part(fleet, args, lambda result: save("scale", result)),
             "update": lambda: update_part(fleet, args, n_max, work),
             "kill": lambda: kill_part(fleet, args, n_max, work)}
    try:
        for part in [p for p in PARTS if p in args.parts]:
            save(part, steps[part]())
    finally:
        fleet.close()
    print_table(doc)
    print(f"wrote {path}")
    if plot(doc, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
