"""`fleetctl bench` and `bench/serve.py`: the load generator's command line (fleetctl/loadgen.py
holds the load generator itself), with the fleet's URL, CA and key as defaults when there is one."""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import aiohttp
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleetctl import loadgen_report
from fleetctl.loadgen import (WORKLOADS, BenchConfig, BenchRun, RequestResult, RequestSpec, fetch_model_name,
                              make_requests, run_benchmark)


def fleet_defaults(state_dir) -> dict:
    """`fleetctl bench` aims at the fleet when there is one: its HTTPS URL, its CA and the key
    fleetctl sends (each still overridden by the option or its environment variable). The CLI
    hands these to click as the command's default_map."""
    if not state_dir.has_fleet():
        return {}
    from fleetctl.tls import planned_paths

    config = state_dir.load().config
    defaults = {"base_url": config.public_url}
    ca = planned_paths(state_dir.tls_dir, config.tls_cert, config.tls_key).ca
    if ca and ca.exists():
        defaults["ca_file"] = str(ca)
    if config.client_api_key:
        defaults["api_key"] = config.client_api_key
    return defaults


def _parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise click.BadParameter(f"expected N or LOW:HIGH, got {text!r}") from None


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base-url", required=True, envvar="PAGEFLEET_URL",
              help="OpenAI-compatible server: the fleet (https://HOST:PORT) or one replica (http://127.0.0.1:8001).")
@click.option("--model", help="Model name to send. Default: the first one /v1/models lists.")
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="W4", show_default=True,
              help="Preset from WORKLOADS.md; the options below override its fields.")
@click.option("--num-requests", type=click.IntRange(min=1), help="Requests to send.")
@click.option("--prompt-len", type=_parse_range, metavar="N|LOW:HIGH",
              help="Prompt tokens: N or LOW:HIGH (uniform).")
@click.option("--output-len", type=_parse_range, metavar="N|LOW:HIGH",
              help="Output tokens, exact: N or LOW:HIGH (uniform).")
@click.option("--concurrency", type=click.IntRange(min=0), help="Cap on requests in flight; 0: no cap.")
@click.option("--request-rate", type=float, default=math.inf, show_default=True,
              help="Open-loop Poisson arrivals, requests/s; inf sends all at once.")
@click.option("--vocab-size", type=click.IntRange(min=2), default=32000, show_default=True,
              help="Prompt token ids are drawn from [0, vocab-size): keep it within the model's vocabulary.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-stream", is_flag=True, help="Non-streaming requests (TTFT is then the whole response).")
@click.option("--no-ignore-eos", is_flag=True,
              help="Do not send ignore_eos (servers without it); outputs may then end before their length.")
@click.option("--api-key", envvar="PAGEFLEET_API_KEY", help="Bearer token (env PAGEFLEET_API_KEY).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="CA to verify the fleet's TLS with.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Longest silence on one request, seconds.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write results as JSON here, and latency/throughput charts to the same name with .png.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def bench_command(base_url, model, workload, num_requests, prompt_len, output_len, concurrency, request_rate,
                  vocab_size, seed, no_stream, no_ignore_eos, api_key, ca_file, timeout_s, out, as_json) -> None:
    """Load-test an OpenAI-compatible completions endpoint and report throughput and latency.

    Prompts are random token ids; every request generates exactly its output length
    (ignore_eos). Exit status: 0 when every request succeeded, 1 when any failed.

    \b
    Examples:
      # W4: 1000 mixed requests at concurrency 128, through the fleet's NGINX
      bench --base-url https://localhost:8443 --ca-file tls/ca.pem --out bench/results/w4.json
      # 32 requests of 512 in / 128 out at 4 requests/s against one replica
      bench --base-url http://127.0.0.1:8001 --num-requests 32 --prompt-len 512 \\
            --output-len 128 --request-rate 4 --concurrency 0
    """
    preset = WORKLOADS[workload]
    cap = preset.concurrency if concurrency is None else (concurrency or None)
    workload_info = {"preset": workload, "num_requests": num_requests or preset.num_requests,
                     "prompt_len": prompt_len or preset.prompt_len, "output_len": output_len or preset.output_len,
                     "vocab_size": vocab_size, "seed": seed}
    try:
        requests = make_requests(workload_info["num_requests"], workload_info["prompt_len"],
                                 workload_info["output_len"], vocab_size=vocab_size, seed=seed)
        model = model or asyncio.run(fetch_model_name(base_url, api_key, ca_file))
        config = BenchConfig(base_url, model, concurrency=cap, request_rate=request_rate,
                             is_streaming=not no_stream, ignore_eos=not no_ignore_eos, api_key=api_key,
                             ca_file=ca_file, timeout_s=timeout_s, seed=seed)
    except (ValueError, aiohttp.ClientError) as exc:
        raise click.ClickException(f"{exc}") from None
    run = _run_with_progress(config, requests, Console(stderr=True))
    summary = loadgen_report.summarize(run)
    bins = loadgen_report.timeline(run)
    title = f"{workload_info['num_requests']} requests, concurrency {cap or 'uncapped'}, {base_url}"
    if as_json:
        click.echo(json.dumps(loadgen_report.finite_json(summary), indent=2))
    else:
        loadgen_report.print_report(summary, title=title)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        loadgen_report.write_json(out, run, summary, bins, workload_info)
        is_png = loadgen_report.write_png(out.with_suffix(".png"), run, bins, title=title)
        click.echo(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if is_png else
                                     " (no PNG: install matplotlib for charts)"), err=True)
    if summary["num_errors"]:
        click.get_current_context().exit(1)


def _run_with_progress(config: BenchConfig, requests: list[RequestSpec], console: Console) -> BenchRun:
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("errors: {task.fields[errors]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("requests", total=len(requests), errors=0)
        num_errors = 0

        def on_result(result: RequestResult) -> None:
            nonlocal num_errors
            num_errors += not result.is_ok
            progress.update(task, advance=1, errors=num_errors)

        return asyncio.run(run_benchmark(config, requests, on_result))


def main(argv: list[str] | None = None) -> int:
    """Entry point for `bench/serve.py`; returns the exit status. (`fleetctl bench` can add
    `bench_command` to its click group instead.)"""
    try:
        return bench_command.main(args=argv, prog_name="bench", standalone_mode=False) or 0
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130
