"""Model groups: one fleet serving several models side by side, each with its own replicas.

A group is a model, the name clients put in `model`, a replica count, its GPUs and its engine
settings (any `replica serve` option in ENGINE_OPTIONS). NGINX routes each request to the group
its body names (lb/pagefleet.js). A fleet without groups has one implicit group, "default",
made of FleetConfig's own model fields, so every single-model fleet reads as before.

Invariants: group names are unique and DNS-label-like (they name replicas' records and
upstreams); served names are unique across groups (they are the routing key).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.errors import ConfigError
from fleetctl.models import BUNDLED, default_served_name, is_store_name

DEFAULT_GROUP = "default"
_GROUP_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")

# `replica serve` options a group may set, with their types; passed as --name-with-dashes.
ENGINE_OPTIONS: dict[str, type] = {
    "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int, "num_kv_blocks": int,
    "gpu_memory_utilization": float, "dtype": str, "enforce_eager": bool, "cuda_graph_max_tokens": int,
    "load_format": str,
    "quantization": str, "kv_cache_dtype": str, "max_queue": int, "max_body_bytes": int, "max_n": int,
    "enable_prefix_caching": bool, "enable_overlap": bool, "kernel_backend": str, "block_size": int,
    "seed": int, "tool_call_parser": str,
}


@dataclass
class ModelGroup:
    name: str
    model: str  # a path or the bundled alias
    served_model_name: str = ""  # default: derived from the model, as `replica serve` does
    num_replicas: int = 1
    gpus: list[str] = field(default_factory=list)  # this group's GPUs; empty: the fleet's --gpus, or CPU
    engine: dict[str, object] = field(default_factory=dict)  # ENGINE_OPTIONS → value

    def __post_init__(self) -> None:
        if self.model not in BUNDLED and not is_store_name(self.model):    # names stay names
            self.model = str(Path(self.model).expanduser().resolve())
        if not self.served_model_name:
            self.served_model_name = default_served_name(self.model)
        self.gpus = [str(g) for g in self.gpus]
        where = f"group {self.name!r}"
        _check(bool(_GROUP_NAME_RE.match(self.name)),
               f"{where}: a group name is 1-32 of a-z 0-9 - (starting and ending alphanumeric)")
        _check(bool(_SERVED_NAME_RE.match(self.served_model_name)),
               f"{where}: served_model_name {self.served_model_name!r} may use only A-Z a-z 0-9 . _ : / -")
        _check(isinstance(self.num_replicas, int) and 0 <= self.num_replicas <= 256,
               f"{where}: replicas must be between 0 and 256")
        for key, value in self.engine.items():
            kind = ENGINE_OPTIONS.get(key)
            _check(kind is not None, f"{where}: unknown engine setting {key!r}; "
                                     f"known: {', '.join(sorted(ENGINE_OPTIONS))}")
            ok = isinstance(value, bool) if kind is bool else \
                isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
                isinstance(value, kind) and not isinstance(value, bool)
            _check(ok, f"{where}: engine setting {key} must be {kind.__name__}, not {value!r}")

    def engine_args(self) -> list[str]:
        """The engine settings as `replica serve` arguments (a False flag as --no-NAME)."""
        args = []
        for key, value in sorted(self.engine.items()):
            option = "--" + key.replace("_", "-")
            if isinstance(value, bool):      # replica serve's flags come as --x / --no-x
                args += [option if value else "--no-" + key.replace("_", "-")]
            else:
                args += [option, f"{value:g}" if isinstance(value, float) else str(value)]
        return args

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "served_model_name": self.served_model_name,
                "num_replicas": self.num_replicas, "gpus": list(self.gpus), "engine": dict(self.engine)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelGroup":
        known = {"name", "model", "served_model_name", "num_replicas", "gpus", "engine"}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"group {data.get('name')!r}: unknown field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        _check("name" in data and "model" in data, "every group needs a name and a model")
        return cls(**data)


def parse_group_option(text: str) -> ModelGroup:
    """`--group NAME=MODEL[,replicas=N][,gpus=0:1][,served=NAME][,SETTING=VALUE...]`, the command
    line's form of one fleet-file group; SETTING is any of ENGINE_OPTIONS (true/false for flags).

        --group chat=/models/Llama-3.1-8B-Instruct,replicas=2,gpus=0:1,max_num_seqs=128
        --group small=smollm2,replicas=1
    """
    head, *rest = text.split(",")
    name, sep, model = head.partition("=")
    _check(bool(sep and name and model), f"--group {text!r}: start with NAME=MODEL, e.g. chat=smollm2")
    group = ModelGroup(name=name.strip(), model=model.strip())
    for item in rest:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        _check(bool(sep and key), f"--group {text!r}: {item!r} is not KEY=VALUE")
        if key == "replicas":
            _check(value.isdigit(), f"--group {text!r}: replicas must be a whole number")
            group.num_replicas = int(value)
        elif key == "gpus":
            group.gpus = [g for g in value.split(":") if g]
        elif key == "served":
            group.served_model_name = value
        elif key in ENGINE_OPTIONS:
            kind = ENGINE_OPTIONS[key]
            try:
                group.engine[key] = ({"true": True, "false": False}[value.lower()] if kind is bool
                                     else kind(value))
            except (KeyError, ValueError):
                raise ConfigError(f"--group {text!r}: {key} must be {kind.__name__}, not {value!r}") from None
        else:
            raise ConfigError(f"--group {text!r}: unknown setting {key!r}; known: replicas, gpus, served, "
                              f"{', '.join(sorted(ENGINE_OPTIONS))}")
    return group


def check_groups(groups: list[ModelGroup]) -> None:
    names = [g.name for g in groups]
    served = [g.served_model_name for g in groups]
    _check(len(set(names)) == len(names), f"group names must differ, got {names}")
    _check(len(set(served)) == len(served), f"served model names must differ across groups, got {served}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
