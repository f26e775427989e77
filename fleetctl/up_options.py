"""The options of `fleetctl up`: each sets one FleetConfig field (UP_FIELDS), shows that field's
default in --help (ConfigOption), and counts only when given on the command line
(`given_options`), so that a later `up` changes only what it names."""
from __future__ import annotations

import dataclasses
import shlex

import click

from fleetctl.config import FleetConfig, parse_gpus
from fleetctl.errors import ConfigError

# CLI option → FleetConfig field, for the options of `up`.
UP_FIELDS = {
    "replicas": "num_replicas", "model": "model", "served_model_name": "served_model_name",
    "backend": "backend", "gpus": "gpus", "routing": "routing", "prefix_chars": "prefix_key_chars",
    "prefix_max_conns": "prefix_max_conns", "listen": "listen", "port": "https_port",
    "http_port": "http_port", "internal_port": "internal_port", "ollama_port": "ollama_port",
    "tls_name": "tls_names", "tls_cert": "tls_cert",
    "tls_key": "tls_key", "api_key": "api_keys", "rate_limit": "rate_limit_per_s", "burst": "rate_limit_burst",
    "max_body_size": "client_max_body_size", "read_timeout": "read_timeout_s", "device": "device",
    "max_model_len": "max_model_len", "num_kv_blocks": "num_kv_blocks", "drain_timeout": "drain_timeout_s",
    "ready_timeout": "ready_timeout_s", "image": "image", "replica_command": "replica_command",
    "mount": "mounts", "env": "env", "group": "groups", "constraint": "constraints", "docker_host": "docker_host",
    "health_interval": "health_interval_s", "update_monitor": "update_monitor_s",
}


class ConfigOption(click.Option):
    """An `up` option that sets a FleetConfig field. It has no default of its own (an option left
    out keeps the saved fleet's value), yet --help shows FleetConfig's default for the field, or
    `shown` where that default is derived from other settings."""

    def __init__(self, *args, shown: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.shown_default = shown or config_default(UP_FIELDS[self.name])

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        if self.shown_default:
            extra["default"] = self.shown_default
        return extra


def config_default(field_name: str) -> str:
    field = next(f for f in dataclasses.fields(FleetConfig) if f.name == field_name)
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def given_options(options: dict) -> dict:
    """The `up` options set on the command line, as FleetConfig fields."""
    given = {}
    for name, value in options.items():
        if value is None or value == ():
            continue
        if name == "gpus":
            value = parse_gpus(value)
        elif name == "replica_command":
            value = shlex.split(value)
        elif name == "group":
            from fleetctl.groups import parse_group_option

            value = [parse_group_option(item).to_dict() for item in value]
        elif name == "env":
            if any("=" not in item for item in value):
                raise ConfigError("--env takes KEY=VALUE")
            value = dict(item.split("=", 1) for item in value)
        elif isinstance(value, tuple):
            value = list(value)
        given[UP_FIELDS[name]] = value
    return given
