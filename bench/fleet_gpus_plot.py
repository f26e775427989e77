"""The PNG of `bench/fleet_gpus.py`'s results: requests/s against replicas (beside N x one replica's),
TTFT and ITL p50/p99 for each N, and the update and kill figures as text.

    python bench/fleet_gpus_plot.py RESULTS.json [MORE.json ...] [--out PNG]

Each JSON may hold any of the parts (scale, update, kill); the first that has a part supplies it.
Default PNG: the first JSON's path with .png. Needs matplotlib (exit 1 with a message without it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def merged(docs: list[dict]) -> dict:
    out: dict = {}
    for doc in docs:
        for key, value in doc.items():
            out.setdefault(key, value)
    return out


def summary_lines(doc: dict) -> list[str]:
    lines = []
    if "update" in doc:
        u, load = doc["update"], doc["update"]["load"]
        lines.append(f"rolling update of {u['num_replicas']} under {u['concurrency']} in flight: "
                     f"{u['duration_s']:.0f} s, {load['num_ok']} ok, {load['num_failed']} failed")
    if "kill" in doc:
        k = doc["kill"]
        lines.append(f"kill -9 of one of {k['num_replicas']} mid-stream: {k['open_at_kill']['num_failed']} open "
                     f"streams ended with an error, {k['num_hung']} hung; new requests {k['after_kill']['num_ok']} ok, "
                     f"{k['after_kill']['num_failed']} failed; whole again after {k['recovered_after_s']:.0f} s")
    return lines


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = doc.get("scale", {}).get("rows", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if rows:
        ns = [r["num_replicas"] for r in rows]
        one = next((r["requests_per_s"] for r in rows if r["num_replicas"] == 1), None)
        axes[0].plot(ns, [r["requests_per_s"] for r in rows], "o-", color="#2a6fdb", label="measured")
        if one:
            axes[0].plot(ns, [n * one for n in ns], "--", color="#999999", label="N x one replica")
        for r in rows:
            efficiency = "" if r.get("scaling_efficiency") is None else f" ({r['scaling_efficiency']:.2f})"
            axes[0].annotate(f"{r['requests_per_s']:.1f}{efficiency}",
                             (r["num_replicas"], r["requests_per_s"]), textcoords="offset points", xytext=(4, -12))
        axes[0].set_ylim(bottom=0)
        axes[0].set_xticks(ns)
        axes[0].set_xlabel("replicas (one GPU each)")
        axes[0].set_title("W4 requests/s through NGINX + TLS")
        axes[0].legend()
        width = 0.2
        for i, (key, label) in enumerate([("ttft_ms_p50", "TTFT p50"), ("ttft_ms_p99", "TTFT p99"),
                                          ("itl_ms_p50", "ITL p50"), ("itl_ms_p99", "ITL p99")]):
            axes[1].bar([j + (i - 1.5) * width for j in range(len(rows))], [r[key] for r in rows], width, label=label)
        axes[1].set_yscale("log")
        axes[1].set_xticks(range(len(rows)), [f"{n} replica(s)" for n in ns])
        axes[1].set_ylabel("ms")
        axes[1].set_title("latency")
        axes[1].legend(fontsize=8)
    title = f"{len(doc.get('gpus', []))} x {doc.get('gpu', '')}, Llama-3-8B shape, {doc.get('date', '')[:10]}"
    fig.suptitle("\n".join([title, *summary_lines(doc)]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    doc = merged([json.loads(path.read_text()) for path in args.results])
    out = args.out or args.results[0].with_suffix(".png")
    if not plot(doc, out):
        print("fleet_gpus_plot: matplotlib is not installed; pip install matplotlib", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
