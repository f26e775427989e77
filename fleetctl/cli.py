"""fleetctl: run a fleet of pagefleet replicas behind NGINX with TLS, and keep it healthy.

Commands only (their group: cli_group.py); the work lives in fleet.py, lifecycle.py, rollout.py,
health.py, status.py, render.py and bench_cli.py (`bench`, loaded only when used: it brings numpy
and aiohttp).
Errors are one line saying what to do, with the exit codes listed in errors.py.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from fleetctl import output
from fleetctl.cli_group import FleetGroup, console, err
from fleetctl.config import BACKENDS, ROUTINGS, FleetConfig
from fleetctl.errors import EXIT_DEGRADED, FleetError
from fleetctl.fleet import Fleet
from fleetctl.groups import DEFAULT_GROUP
from fleetctl.health import DEFAULT_FAILURE_THRESHOLD, DEFAULT_INTERVAL_S, DEFAULT_RESTART_AFTER_S
from fleetctl.state import StateDir
from fleetctl.status import collect
from fleetctl.up_options import ConfigOption, given_options

@click.group(cls=FleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=output.version(), message="fleetctl %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run pagefleet replicas behind NGINX with TLS, on local processes, Docker or Swarm.

    \b
    Quick start (no GPU, no Docker needed):
      fleetctl up --replicas 2        # 2 replicas of the bundled SmolLM2, https://localhost:8443
      fleetctl status
      fleetctl scale 3
      fleetctl update --model ./new-weights
      fleetctl bench --num-requests 100 --concurrency 8
      fleetctl down

    State (config, TLS, logs, NGINX) lives in $PAGEFLEET_HOME, default ~/.pagefleet.
    Exit codes: 0 ok, 1 failed, 2 usage, 3 not ready in time, 4 nginx/Docker missing,
    5 NGINX rejected the config (the old one keeps serving), 6 no fleet, 7 degraded.
    """
    if ctx.invoked_subcommand == "bench":
        from fleetctl.bench_cli import fleet_defaults

        ctx.default_map = {**(ctx.default_map or {}), "bench": fleet_defaults(_state_dir())}


def _print_report(fleet: Fleet, as_json: bool) -> dict:
    report = collect(fleet)
    if as_json:
        console.print_json(json.dumps(report))
    else:
        output.print_status(console, report)
    return report


def _state_dir() -> StateDir:
    return StateDir()


def _fleet(say=None) -> Fleet:
    return Fleet(_state_dir(), say=say or (lambda line: err.print(line, highlight=False, soft_wrap=True)))


@cli.command()
@click.option("--replicas", "-n", cls=ConfigOption, type=click.IntRange(0, 256), help="Number of replicas.")
@click.option("--model", "-m", cls=ConfigOption, help="Safetensors folder, GGUF file, or the bundled alias.")
@click.option("--served-model-name", cls=ConfigOption, shown="derived from --model",
              help="Name clients put in `model`.")
@click.option("--backend", "-b", cls=ConfigOption, type=click.Choice(BACKENDS),
              shown="docker if an engine answers, else local")
@click.option("--gpus", cls=ConfigOption, shown="none, CPU", help="GPUs to use, one replica each, round-robin: 0,1,2 or all.")
@click.option("--routing", cls=ConfigOption, type=click.Choice(ROUTINGS),
              help="least_conn; session: hash on X-Session-ID; prefix: prompts that start alike go to one replica.")
@click.option("--prefix-chars", cls=ConfigOption, type=click.IntRange(1), help="prefix routing: characters of the "
              "prompt (tools, system prompt, messages) that pick the replica, ~4 per token.")
@click.option("--prefix-max-conns", cls=ConfigOption, type=click.IntRange(1),
              help="prefix routing: requests in flight a replica takes before the next one on the ring; "
              "set it a little above the load you expect per replica.")
@click.option("--listen", cls=ConfigOption, help="Address of the public listeners; 0.0.0.0 for all.")
@click.option("--port", cls=ConfigOption, type=int, help="Public HTTPS port.")
@click.option("--http-port", cls=ConfigOption, type=int, help="HTTP port that redirects to HTTPS with 308.")
@click.option("--internal-port", cls=ConfigOption, type=int, help="Loopback port for /metrics, /health, stub_status.")
@click.option("--ollama-port", cls=ConfigOption, type=int,
              help="Also serve the API in plain HTTP on 127.0.0.1:PORT, e.g. 11434 for Ollama apps.")
@click.option("--tls-name", cls=ConfigOption, multiple=True, help="Host name or IP in the certificate (repeat).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Your own certificate chain (PEM), not the local CA.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Its private key (PEM).")
@click.option("--api-key", multiple=True, help="Key clients must send as `Authorization: Bearer KEY` (repeat).")
@click.option("--rate-limit", cls=ConfigOption, type=float, help="Requests/s per API key (or per IP without one).")
@click.option("--burst", cls=ConfigOption, type=int, help="Requests allowed above the rate before 429.")
@click.option("--max-body-size", cls=ConfigOption, help="Largest request body, e.g. 8m.")
@click.option("--read-timeout", cls=ConfigOption, type=int, help="Seconds NGINX waits for a replica's next bytes.")
@click.option("--device", cls=ConfigOption, type=click.Choice(["cpu", "cuda"]), shown="cuda with --gpus, else cpu")
@click.option("--max-model-len", type=int, help="Passed to each replica.")
@click.option("--num-kv-blocks", type=int, help="Passed to each replica.")
@click.option("--drain-timeout", cls=ConfigOption, type=float, help="Seconds a stopping replica may finish requests.")
@click.option("--ready-timeout", cls=ConfigOption, type=float, help="Seconds to wait for a replica's /ready.")
@click.option("--image", cls=ConfigOption, help="Docker/Swarm: replica image.")
@click.option("--replica-command", cls=ConfigOption, help="Docker/Swarm: command that runs `replica` in the image.")
@click.option("--mount", multiple=True, help="Docker/Swarm: extra host path to mount read-only, SRC[:DST] (repeat).")
@click.option("--env", multiple=True, help="Docker/Swarm: KEY=VALUE for the replica containers (repeat).")
@click.option("--constraint", multiple=True, help="Swarm: placement constraint, e.g. node.labels.gpu==true (repeat).")
@click.option("--docker-host", cls=ConfigOption, shown="$DOCKER_HOST or the local socket", help="Docker engine URL.")
@click.option("--health-interval", cls=ConfigOption, type=float,
              help="Swarm: seconds between the health checks (/ready) of a task; set when its service is created.")
@click.option("--update-monitor", cls=ConfigOption, type=float,
              help="Swarm: seconds Swarm watches each task an update started for a failure.")
@click.option("--group", "-g", multiple=True, metavar="NAME=MODEL[,KEY=VALUE...]",
              help="A model group (repeat for several; NGINX routes by `model`): "
                   "NAME=MODEL[,replicas=N][,gpus=0:1][,served=NAME][,max_num_seqs=128...].")
@click.option("--file", "-f", "fleet_file", type=click.Path(exists=True, dir_okay=False),
              help="Fleet file (YAML; `fleetctl render fleet` prints one): settings and model groups; "
                   "options given here override it.")
@click.option("--watch", "then_watch", is_flag=True, help="Keep running as the health watcher afterwards.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def up(then_watch: bool, as_json: bool, fleet_file: str | None, **options) -> None:
    """Start (or converge) the fleet: TLS, N replicas, NGINX in front.

    Idempotent: run it again and it converges to N without touching healthy replicas.

    \b
    Examples:
      fleetctl up --replicas 2
      fleetctl up --replicas 4 --backend docker --gpus 0,1,2,3 --api-key "$KEY"
      fleetctl up --listen 0.0.0.0 --tls-name llm.example.com --port 443 --http-port 80
      fleetctl up -f fleet.yaml     # several model groups; NGINX routes by `model`
      fleetctl up --group chat=/models/llama,replicas=2 --group small=smollm2
    fleetctl up --group chat=/models/llama,replicas=2 --group small=smollm2
    """
    from fleetctl.backends import default_backend
    from fleetctl.config import load_fleet_file
    from fleetctl.lifecycle import fail_up, open_or_create, preflight, up as up_fleet

    given = {**(load_fleet_file(fleet_file) if fleet_file else {}), **given_options(options)}
    state_dir = _state_dir()
    is_new_fleet = not state_dir.has_fleet()
    if state_dir.has_fleet():
        state_dir.load().refuse_during_update("run `fleetctl up`")
    else:
        if "backend" not in given:
            given["backend"] = default_backend(given.get("docker_host", ""))
        preflight(FleetConfig(**given))
    state = open_or_create(state_dir, given)
    fleet = _fleet()
    try:
        with output.ready_progress(err, sum(g.num_replicas for g in state.config.model_groups())) as progress:
            up_fleet(fleet, progress)
    except (Exception, KeyboardInterrupt) as exc:
        raise fail_up(fleet, is_new_fleet, exc) from exc
    report = collect(fleet)
    if as_json:
        report["examples"] = output.examples(state_dir, report)
        console.print_json(json.dumps(report))
    else:
        output.print_up(console, state_dir, report)
    if then_watch:
        _watch(fleet)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """One row per replica (address, model, ready, running/waiting requests, KV-cache use,
    uptime) and the NGINX state. Exit code 7 when fewer replicas are ready than asked for.

    \b
    Examples:
      fleetctl status
      fleetctl status --json | jq '.replicas[] | {id, is_ready}'
    """
    report = _print_report(_fleet(), as_json)
    if report["is_degraded"]:
        sys.exit(EXIT_DEGRADED)


@cli.command()
@click.argument("replicas", type=click.IntRange(0, 256))
@click.option("--group", "-g", help="The model group to scale (a fleet with several must name one).")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
def scale(replicas: int, group: str | None, as_json: bool) -> None:
    """Change the number of replicas. New ones get traffic only once ready; removed ones leave
    NGINX first, finish their requests, then stop.

    \b
    Examples:
      fleetctl scale 3
      fleetctl scale 1 --group small
    """
    from fleetctl.lifecycle import converge

    fleet = _fleet()
    fleet.state_dir.load().refuse_during_update("scale")  # NoFleetError early too
    with output.ready_progress(err, replicas) as progress:
        converge(fleet, replicas, progress, group)
    _print_report(fleet, as_json)


@cli.command()
@click.option("--model", "-m", required=True, help="The new weights: safetensors folder, GGUF file or bundled alias.")
@click.option("--max-surge", type=click.IntRange(0, 1), default=1, show_default=True,
              help="1: each new replica starts beside the old one it replaces (CPU, or a free GPU in --gpus).")
@click.option("--max-unavailable", type=click.IntRange(0, 1), default=0, show_default=True,
              help="1: with no room for one more replica, the old one leaves first (one fewer serves meanwhile).")
@click.option("--group", "-g", default=DEFAULT_GROUP, help="The model group to move (a fleet of several).")
@click.option("--timeout", "timeout_s", type=float,
              help="Seconds each new replica gets to pass /ready and its test generation [default: --ready-timeout].")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
def update(model: str, max_surge: int, max_unavailable: int, group: str, timeout_s: float | None,
           as_json: bool) -> None:
    """Roll the fleet onto new weights, one replica at a time, without dropping a request.

    For each old replica: a new one starts with --model, must answer /ready and generate a few
    tokens, enters NGINX; then the old one leaves NGINX, finishes its requests and stops. The
    served model name stays, so clients keep their `model` field. A new replica that fails its
    check halts the update and rolls back: NGINX ends serving only the old weights, and the
    command exits 1 with the reason. `fleetctl status` shows where an update stands and which
    weights each replica serves; an interrupted update resumes when run again.

    \b
    Examples:
      fleetctl update --model /models/Llama-3.1-8B-Instruct-v2
      fleetctl update --model ./ckpt --max-surge 0 --max-unavailable 1   # no spare GPU
      fleetctl status --json | jq '.update, [.replicas[] | {id, weights}]'
    """
    from fleetctl.rollout import Rollout, UpdateOptions

    options = UpdateOptions(model, max_surge, max_unavailable, timeout_s or 0.0, group)
    fleet = _fleet()
    state = fleet.state_dir.load()
    state.config.group(group)  # ConfigError naming the groups there are
    with output.update_progress(err, len(state.active(group))) as progress:
        Rollout(fleet, options, progress).run()
    _print_report(fleet, as_json)


@cli.command()
@click.option("--purge", is_flag=True, help="Also delete the state directory (CA, logs).")
@click.option("--json", "as_json", is_flag=True, help="Print what was stopped as JSON.")
def down(purge: bool, as_json: bool) -> None:
    """Stop NGINX and every replica (each drains its requests first). Safe to run twice.

    \b
    Examples:
      fleetctl down
      fleetctl down --purge     # forget the CA and the logs too
    """
    from fleetctl.lifecycle import down as down_fleet

    state_dir = _state_dir()
    had_fleet = state_dir.has_fleet()
    stopped = down_fleet(_fleet(), purge=purge)
    if as_json:
        console.print_json(json.dumps({"stopped": stopped, "state_dir": str(state_dir.root)}))
    else:
        console.print(f"stopped NGINX and {len(stopped)} replica(s)" if had_fleet else "no fleet was running")


@cli.command()
@click.argument("replica")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--tail", "-t", type=int, default=200, show_default=True, help="Lines of history.")
def logs(replica: str, follow: bool, tail: int) -> None:
    """Print a replica's output. REPLICA is an id from `fleetctl status` (r1, r2, ...),
    `nginx` (NGINX's error log), `access` (its access log) or `events` (the fleet's actions).

    \b
    Examples:
      fleetctl logs r1 -f
      fleetctl logs events
    """
    from fleetctl.follow import follow_file

    fleet = _fleet()
    nginx = fleet.nginx()
    files = {"nginx": nginx.error_log, "access": nginx.access_log, "events": fleet.state_dir.events_file}
    if replica in files:
        lines = follow_file(files[replica], follow, tail)
    elif fleet.backend.has_logs(replica) or replica in fleet.state_dir.load().replicas:
        lines = fleet.backend.logs(replica, follow=follow, tail=tail)  # a local log outlives its replica
    else:
        raise FleetError(f"no replica {replica!r}; `fleetctl status` lists them")
    try:
        for line in lines:
            click.echo(line)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("what", default="nginx")
@click.option("--replicas", "-n", type=int, default=2, show_default=True,
              help="Placeholder replicas when there is no fleet yet.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="compose only: write the whole bundle into this folder (Compose file, nginx.conf, tls/, "
                   "prometheus.yml, grafana/), ready for `docker compose up`.")
def render(what: str, replicas: int, out: Path | None) -> None:
    """Print a generated file without starting anything, for the current fleet (or a default
    one): WHAT is nginx (the default), fleet (a fleet file for `up -f`), prometheus (scrape
    config) or compose (a Compose file).

    \b
    Examples:
      fleetctl render > nginx.conf
      fleetctl render prometheus > prometheus.yml
      fleetctl render compose --out ./stack && (cd stack && docker compose up -d)
      fleetctl render fleet > fleet.yaml
    """
    from fleetctl.render import RENDERERS, write_compose_bundle

    if what not in RENDERERS:
        raise click.BadParameter(f"choose one of {', '.join(RENDERERS)}", param_hint="WHAT")
    if out is None:
        click.echo(RENDERERS[what](_state_dir(), replicas), nl=False)
        return
    if what != "compose":
        raise click.BadParameter("--out writes the Compose bundle: use it with `render compose`", param_hint="--out")
    for path in write_compose_bundle(_state_dir(), replicas, out):
        click.echo(path)


@cli.command()
@click.option("--interval", type=float, default=DEFAULT_INTERVAL_S, show_default=True, help="Seconds between polls.")
@click.option("--threshold", type=int, default=DEFAULT_FAILURE_THRESHOLD, show_default=True,
              help="Failed polls before a replica leaves NGINX.")
@click.option("--restart-after", type=float, default=DEFAULT_RESTART_AFTER_S, show_default=True,
              help="Seconds an unhealthy replica gets to recover before it is restarted.")
def watch(interval: float, threshold: int, restart_after: float) -> None:
    """Keep the fleet healthy: poll /health and /ready, take failing replicas out of NGINX,
    restart them, put them back once ready. Every action is printed with its reason and kept
    in `fleetctl logs events`. Stops on Ctrl-C or SIGTERM.

    \b
    Examples:
      fleetctl watch
      fleetctl watch --interval 1 --threshold 1
    """
    fleet = _fleet(say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    fleet.state_dir.load()
    _watch(fleet, interval, threshold, restart_after)


def _watch(fleet: Fleet, interval: float = DEFAULT_INTERVAL_S, threshold: int = DEFAULT_FAILURE_THRESHOLD,
           restart_after: float = DEFAULT_RESTART_AFTER_S) -> None:
    from fleetctl.health import Watcher

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fleet.event("watch", "started", f"every {interval:g} s")
    Watcher(fleet, interval, threshold, restart_after).run(stop)
    if stop.is_set():
        fleet.event("watch", "stopped", "signal")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the store and its models as JSON.")
def models(as_json: bool) -> None:
    """List the models of Ollama's store on this host (the code of `replica models`).

    \b
      fleetctl models
      fleetctl up --model llama3.2:3b      # serve one by its Ollama name
    """
    from replica.cli import print_models

    raise SystemExit(print_models(as_json))


def main() -> None:
    cli(prog_name="fleetctl")


if __name__ == "__main__":
    main()
