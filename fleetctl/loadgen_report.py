"""What a load-generator run means: summary figures, a rich table, JSON, and a PNG.

Throughput figures divide by the run's duration (first send → last response end), so a slow
tail lowers them, as it should. Latency percentiles are over successful requests only;
inter-token latency pools every gap between text chunks of every successful stream.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:   # fleetctl.loadgen imports this module
    from fleetctl.loadgen import BenchRun

PERCENTILES = (50, 90, 99)


def _distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    values_ms = np.asarray(values_s) * 1e3
    return {"mean": float(values_ms.mean()),
            **{f"p{p}": float(np.percentile(values_ms, p)) for p in PERCENTILES}}


def summarize(run: BenchRun) -> dict:
    ok = [r for r in run.results if r.is_ok]
    errors: dict[str, int] = {}
    for r in run.results:
        if not r.is_ok:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    duration_s = run.duration_s if run.duration_s > 0 else math.nan
    num_output_tokens = sum(r.num_output_tokens for r in ok)
    num_prompt_tokens = sum(r.num_prompt_tokens for r in ok)
    # Time per output token after the first, one figure per request (what a reader of one stream sees).
    tpot_s = [(r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1)
              for r in ok if r.ttft_s is not None and r.num_output_tokens > 1]
    return {
        "num_requests": len(run.results),
        "num_ok": len(ok),
        "num_errors": len(run.results) - len(ok),
        "errors_by_status": dict(sorted(errors.items())),
        # Sends lost before any answer (status "unsent" when all of a request's sends were) and
        # re-sent: a reload race or a replica gone, which a client that retries never sees.
        "num_unsent_retries": sum(r.num_unsent_retries for r in run.results),
        "num_unsent": errors.get("unsent", 0),
        # A server that ignored ignore_eos/min_tokens shows up here rather than as a fast benchmark.
        "num_short_outputs": sum(r.num_output_tokens < r.num_output_tokens_expected for r in ok),
        "duration_s": run.duration_s,
        "requests_per_s": len(ok) / duration_s,
        "output_tokens_per_s": num_output_tokens / duration_s,
        "total_tokens_per_s": (num_output_tokens + num_prompt_tokens) / duration_s,
        "num_prompt_tokens": num_prompt_tokens,
        "num_output_tokens": num_output_tokens,
        "ttft_ms": _distribution_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": _distribution_ms([gap for r in ok for gap in r.itl_s]),
        "tpot_ms": _distribution_ms(tpot_s),
        "e2e_ms": _distribution_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
    }


def timeline(run: BenchRun, bin_s: float | None = None) -> list[dict]:
    """Output tokens/s and finished requests/s in bins since the first send (default: about 50 bins).

    Each token chunk counts as num_output_tokens / num_chunks tokens of its request, so the
    total matches the server's usage figures when a chunk carries more than one token. The last
    bin is divided by its own width, which may be shorter than `bin_s`.
    """
    ok = [r for r in run.results if r.is_ok]
    if not ok or run.duration_s <= 0:
        return []
    bin_s = bin_s or min(10.0, max(0.1, run.duration_s / 50))
    first_send = min(r.start_s for r in run.results)
    num_bins = max(1, math.ceil(run.duration_s / bin_s))
    tokens, finished = np.zeros(num_bins), np.zeros(num_bins)
    for r in ok:
        if r.chunk_times_s:
            weight = r.num_output_tokens / len(r.chunk_times_s)
            for t in r.chunk_times_s:
                tokens[min(num_bins - 1, int((r.start_s - first_send + t) / bin_s))] += weight
        finished[min(num_bins - 1, int((r.start_s - first_send + r.e2e_s) / bin_s))] += 1
    widths = [min(bin_s, run.duration_s - i * bin_s) for i in range(num_bins)]
    return [{"t_s": i * bin_s, "width_s": widths[i], "output_tokens_per_s": tokens[i] / widths[i],
             "requests_per_s": finished[i] / widths[i]} for i in range(num_bins)]


def print_report(summary: dict, console: Console | None = None, title: str = "pagefleet bench") -> None:
    console = console or Console()
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("mean", justify="right")
    for p in PERCENTILES:
        table.add_column(f"p{p}", justify="right")
    for key, label in (("ttft_ms", "TTFT (ms)"), ("itl_ms", "inter-token latency (ms)"),
                       ("tpot_ms", "time per output token (ms)"), ("e2e_ms", "end-to-end (ms)")):
        dist = summary[key]
        table.add_row(label, *(_fmt(dist[k]) for k in ("mean", *(f"p{p}" for p in PERCENTILES))))
    console.print(table)
    errors = ", ".join(f"{status}: {n}" for status, n in summary["errors_by_status"].items()) or "none"
    console.print(
        f"requests: {summary['num_ok']}/{summary['num_requests']} ok in {summary['duration_s']:.2f} s | "
        f"[bold]{summary['requests_per_s']:.2f} requests/s[/], "
        f"[bold]{summary['output_tokens_per_s']:.1f} output tokens/s[/], "
        f"{summary['total_tokens_per_s']:.1f} total tokens/s | errors: {errors}"
        + (f" | [yellow]{summary['num_short_outputs']} outputs shorter than asked[/]"
           if summary["num_short_outputs"] else "")
        + (f" | {summary['num_unsent_retries']} sends lost before any answer, re-sent"
           if summary["num_unsent_retries"] else ""))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_json(path: Path, run: BenchRun, summary: dict, bins: list[dict], workload: dict | None = None) -> None:
    config = asdict(run.config)
    config.pop("api_key", None)   # never write the secret next to the results
    requests = [{k: v for k, v in asdict(r).items() if k != "chunk_times_s"} for r in run.results]
    document = {"config": config, "workload": workload or {}, "summary": summary, "timeline": bins,
                "requests": requests}
    path.write_text(json.dumps(finite_json(document), indent=2, allow_nan=False) + "\n")


def finite_json(value):
    """Strict JSON: an infinite request rate becomes "inf", an undefined figure null."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value == math.inf else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_png(path: Path, run: BenchRun, bins: list[dict], title: str = "pagefleet bench") -> bool:
    """Latency CDFs and throughput over time; False (nothing written) without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in run.results if r.is_ok]
    series = {"TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
              "inter-token": [gap for r in ok for gap in r.itl_s],
              "end-to-end": [r.e2e_s for r in ok if r.e2e_s is not None]}
    fig, (cdf_ax, tput_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, values_s in series.items():
        if values_s:
            values_ms = np.sort(np.asarray(values_s) * 1e3)
            cdf_ax.plot(values_ms, np.arange(1, len(values_ms) + 1) / len(values_ms), label=label)
    cdf_ax.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of samples", title="Latency CDF")
    cdf_ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    cdf_ax.grid(True, which="both", alpha=0.3)
    if any(series.values()):
        cdf_ax.legend()
    if bins:
        edges = [b["t_s"] for b in bins] + [bins[-1]["t_s"] + bins[-1]["width_s"]]

        def steps(key):   # repeat the last value so that the last bin is drawn with its width
            return [b[key] for b in bins] + [bins[-1][key]]

        tput_ax.step(edges, steps("output_tokens_per_s"), where="post", label="output tokens/s")
        req_ax = tput_ax.twinx()
        req_ax.step(edges, steps("requests_per_s"), where="post", color="tab:orange", label="finished requests/s")
        req_ax.set_ylabel("finished requests/s")
        req_ax.set_ylim(bottom=0)
        handles = tput_ax.get_legend_handles_labels()[0] + req_ax.get_legend_handles_labels()[0]
        tput_ax.legend(handles, [h.get_label() for h in handles], loc="lower center")
    tput_ax.set_ylim(bottom=0)
    tput_ax.set(xlabel="time since first request (s)", ylabel="output tokens/s", title="Throughput over time")
    tput_ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
