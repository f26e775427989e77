"""Ollama's model store, read in place: names, manifests and layers.

Layout (as Ollama writes it; pagefleet only reads):

    <store>/manifests/<host>/<namespace>/<model>/<tag>    JSON, Docker's v2 manifest shape
    <store>/blobs/sha256-<hex>                            content-addressed layers

The store is `$OLLAMA_MODELS`, else `~/.ollama/models`, else `/usr/share/ollama/.ollama/models`
(the Linux service's). Names resolve as Ollama resolves them: `llama3.2` is
`registry.ollama.ai/library/llama3.2:latest`, `myorg/assistant:v1` has its own namespace, and a
name shows without the default host and namespace (`llama3.2:latest`, `myorg/assistant:v1`).

A model's `digest` is the sha256 of its manifest file (what `ollama list` shows the first 12
hex digits of) and its `size_bytes` the sum of its layers and config, as Ollama reports them.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MEDIA_PREFIX = "application/vnd.ollama.image."
MEDIA_MODEL = MEDIA_PREFIX + "model"
MEDIA_PARAMS = MEDIA_PREFIX + "params"
MEDIA_SYSTEM = MEDIA_PREFIX + "system"
MEDIA_TEMPLATE = MEDIA_PREFIX + "template"
MEDIA_LICENSE = MEDIA_PREFIX + "license"
MEDIA_PROJECTOR = MEDIA_PREFIX + "projector"
MEDIA_ADAPTER = MEDIA_PREFIX + "adapter"


def store_candidates(env: dict | None = None) -> list[Path]:
    """Where Ollama keeps its store, in the order Ollama looks."""
    env = os.environ if env is None else env
    if env.get("OLLAMA_MODELS"):
        return [Path(env["OLLAMA_MODELS"]).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def find_store(env: dict | None = None) -> Path | None:
    """The first candidate that has a `manifests` folder; None when no store exists."""
    return next((p for p in store_candidates(env) if (p / "manifests").is_dir()), None)


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, name: str) -> "ModelName":
        """`[host/][namespace/]model[:tag]`; ValueError for a name Ollama would refuse."""
        text = name.strip().split("@", 1)[0]          # a pinned digest names the same model
        tag = DEFAULT_TAG
        last_slash = text.rfind("/")
        if ":" in text[last_slash + 1:]:
            text, tag = text.rsplit(":", 1)
        parts = text.split("/")
        if not 1 <= len(parts) <= 3 or not all(parts) or not tag:
            raise ValueError(f"{name!r} is not an Ollama model name ([host/][namespace/]model[:tag])")
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, model = parts
        elif len(parts) == 2:
            namespace, model = parts
        else:
            (model,) = parts
        for part in (host, namespace, model, tag):
            if any(c in part for c in " \\\t\n") or part in (".", ".."):
                raise ValueError(f"{name!r} is not an Ollama model name")
        return cls(host, namespace, model, tag)

    @property
    def display(self) -> str:
        """As `ollama list` shows it: the default host and namespace left out."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def manifest_relpath(self) -> Path:
        return Path("manifests", self.host, self.namespace, self.model, self.tag)


def same_model(a: str, b: str) -> bool:
    """True when two names mean the same model (`llama3.2` and `library/llama3.2:latest`)."""
    if a == b:
        return True
    try:
        return ModelName.parse(a).display.lower() == ModelName.parse(b).display.lower()
    except ValueError:
        return False


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str                     # "sha256:<hex>"
    size_bytes: int

    def path(self, store: Path) -> Path:
        return store / "blobs" / self.digest.replace(":", "-", 1)


@dataclass
class OllamaModel:
    """One manifest of the store and what its layers say."""
    name: ModelName
    store: Path
    digest: str                     # sha256 hex of the manifest file
    size_bytes: int                 # layers + config, as Ollama reports it
    modified_at: str                # RFC 3339 UTC, the manifest's mtime
    layers: list[Layer]
    params: dict = field(default_factory=dict)   # the params layer: default options
    system: str | None = None
    template: str | None = None     # a Go template (Ollama's own format)
    license: str | None = None
    config: dict = field(default_factory=dict)   # the config blob: model_family, file_type...

    @property
    def model_layer(self) -> Layer:
        return next(layer for layer in self.layers if layer.media_type == MEDIA_MODEL)

    @property
    def model_path(self) -> Path:
        return self.model_layer.path(self.store)

    @property
    def has_projector(self) -> bool:
        return any(layer.media_type == MEDIA_PROJECTOR for layer in self.layers)


def _read_layer_text(layer: Layer, store: Path, display: str) -> str:
    path = layer.path(store)
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        raise ValueError(f"{display}: blob {path.name} ({layer.media_type}) is missing from "
                         f"{store}; run `ollama pull {display}` again") from None


def read_manifest(store: Path, name: ModelName) -> OllamaModel:
    path = store / name.manifest_relpath
    display = name.display
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
        entries = manifest.get("layers") or []
        layers = [Layer(e["mediaType"], e["digest"], int(e.get("size", 0))) for e in entries]
    except OSError:
        raise ValueError(f"{display}: cannot read its manifest {path}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{display}: manifest {path} is not a valid Ollama manifest") from None
    config = manifest.get("config") or {}
    model = OllamaModel(
        name=name, store=store, digest=hashlib.sha256(raw).hexdigest(),
        size_bytes=sum(layer.size_bytes for layer in layers) + int(config.get("size", 0) or 0),
        modified_at=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        .isoformat().replace("+00:00", "Z"),
        layers=layers)
    if config.get("digest"):
        try:
            loaded = json.loads(Layer("", config["digest"], 0).path(store).read_text())
            model.config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass                      # optional: only the details shown by /api/show use it
    if not any(layer.media_type == MEDIA_MODEL for layer in layers):
        raise ValueError(f"{display}: its manifest has no model layer ({MEDIA_MODEL})")
    for layer in layers:
        if layer.media_type == MEDIA_PARAMS:
            try:
                params = json.loads(_read_layer_text(layer, store, display))
            except json.JSONDecodeError:
                raise ValueError(f"{display}: its params layer is not JSON") from None
            if not isinstance(params, dict):
                raise ValueError(f"{display}: its params layer is not a JSON object")
            model.params = params
        elif layer.media_type == MEDIA_SYSTEM:
            model.system = _read_layer_text(layer, store, display)
        elif layer.media_type == MEDIA_TEMPLATE:
            model.template = _read_layer_text(layer, store, display)
        elif layer.media_type == MEDIA_LICENSE:
            model.license = _read_layer_text(layer, store, display)
    return model


def _find_manifest(store: Path, name: ModelName) -> ModelName | None:
    """The name as spelled on disk: exact first, then case-insensitively (Ollama's names are)."""
    if (store / name.manifest_relpath).is_file():
        return name
    wanted = name.display.lower()
    return next((m for m in list_names(store) if m.display.lower() == wanted), None)


def list_names(store: Path) -> list[ModelName]:
    root = store / "manifests"
    names = []
    for path in sorted(root.glob("*/*/*/*")):
        if path.is_file():
            host, namespace, model, tag = path.relative_to(root).parts
            names.append(ModelName(host, namespace, model, tag))
    return names


def list_models(store: Path) -> list[OllamaModel]:
    """Every readable model of the store, newest first (as `ollama list` orders them)."""
    models = []
    for name in list_names(store):
        try:
            models.append(read_manifest(store, name))
        except ValueError:
            continue                # a half-written or foreign manifest: not a model to list
    return sorted(models, key=lambda m: m.modified_at, reverse=True)


def open_model(name: str, env: dict | None = None) -> OllamaModel:
    """The store's model of that name; ValueError that says where it looked and what to do."""
    parsed = ModelName.parse(name)
    store = find_store(env)
    if store is None:
        where = ", ".join(str(p) for p in store_candidates(env))
        raise ValueError(f"model {name!r} is not a path, and no Ollama store was found (looked in "
                         f"{where}); set OLLAMA_MODELS or pull it with `ollama pull {name}`")
    found = _find_manifest(store, parsed)
    if found is None:
        raise ValueError(f"model {name!r} ({parsed.display}) is not in the Ollama store {store}; "
                         f"pull it with `ollama pull {parsed.display}` (`replica models` lists "
                         "the store)")
    model = read_manifest(store, found)
    if not model.model_path.is_file():
        raise ValueError(f"{found.display}: its model blob {model.model_path.name} is missing "
                         f"from {store}; run `ollama pull {found.display}` again")
    return model


def lookup(model: str, env: dict | None = None, served_name: str | None = None) -> OllamaModel | None:
    """The store model `model` names (a name, or the path of a model blob inside a store, as
    fleetctl passes it; `served_name` picks among manifests that share the blob), or None."""
    path = Path(model).expanduser()
    if path.exists():
        return find_model_of_blob(path.resolve(), served_name) if path.is_file() else None
    try:
        return open_model(model, env)
    except ValueError:
        return None


def find_model_of_blob(blob: Path, prefer: str | None = None) -> OllamaModel | None:
    """A store model whose model layer is this blob (blobs are content-addressed, so the blob's
    own store holds its manifests): the one named `prefer` if it is among them, else the first
    by name; None for a file outside a store."""
    store = blob.parent.parent
    if blob.parent.name != "blobs" or not (store / "manifests").is_dir():
        return None
    digest = blob.name.replace("-", ":", 1)
    found = []
    for name in list_names(store):
        try:
            model = read_manifest(store, name)
        except ValueError:
            continue
        if model.model_layer.digest == digest:
            found.append(model)
    preferred = [m for m in found if prefer and same_model(m.name.display, prefer)]
    return (preferred or found or [None])[0]
