"""Builds an Ollama model store exactly as `ollama pull` / `ollama create` lay it out:
content-addressed blobs named `sha256-<hex>` of their bytes, and Docker v2 manifests under
`manifests/<host>/<namespace>/<model>/<tag>` pointing at them."""
import hashlib
import json
import shutil
from pathlib import Path

MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.ollama.image."

# Ollama's own template of ChatML models (Go text/template), as in its library's qwen2 models.
CHATML_GO_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n")


def add_blob(store: Path, source: bytes | Path) -> dict:
    """Writes one blob; returns its descriptor (digest and size) without the media type."""
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(source, Path):
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        target = blobs / f"sha256-{digest.hexdigest()}"
        if not target.exists():
            shutil.copyfile(source, target)
        return {"digest": f"sha256:{digest.hexdigest()}", "size": source.stat().st_size}
    hexdigest = hashlib.sha256(source).hexdigest()
    (blobs / f"sha256-{hexdigest}").write_bytes(source)
    return {"digest": f"sha256:{hexdigest}", "size": len(source)}


def add_model(store: Path, name: str, gguf_file: Path, *, family: str = "llama",
              file_type: str = "Q4_1", template: str | None = None, system: str | None = None,
              params: dict | None = None, license: str | None = None) -> Path:
    """`name` as `[host/][namespace/]model:tag`; returns the manifest's path."""
    layers = [{"mediaType": LAYER + "model", **add_blob(store, gguf_file)}]
    for kind, text in (("template", template), ("system", system), ("license", license),
                       ("params", json.dumps(params) if params is not None else None)):
        if text is not None:
            layers.append({"mediaType": LAYER + kind, **add_blob(store, text.encode())})
    config = {"model_format": "gguf", "model_family": family, "model_families": [family],
              "model_type": "", "file_type": file_type, "architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA,
                "config": {"mediaType": CONFIG_MEDIA, **add_blob(store, json.dumps(config).encode())},
                "layers": layers}
    path_part, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    parts = path_part.split("/")
    parts = ["registry.ollama.ai", "library"][:3 - len(parts)] + parts
    manifest_path = store.joinpath("manifests", *parts, tag)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest))
    return manifest_path


ASSISTANT_NAME = "myorg/assistant:v1"
ASSISTANT_SYSTEM = "You are a pirate."
# Greedy SmolLM2 as a pirate answers the test question with "Paris" and then "Captain ...": the
# params' stop word cuts the answer before "Paris", which shows the params layer took effect.
ASSISTANT_PARAMS = {"stop": ["Paris"], "temperature": 0, "num_predict": 40, "top_k": 20}


def build_test_store(root: Path, tiny_quants: tuple[str, ...] = ()) -> Path:
    """`library/smollm2:135m` (the bundled GGUF with Ollama's ChatML template, a license and
    params), `myorg/assistant:v1` (the same blob with a system and a params layer), and a tiny
    GGUF per quantisation in `tiny_quants` as `tiny:<quant>`."""
    from replica.models.registry import resolve_model_path
    from tests.models.gguf_files import write_tiny_gguf

    smollm2 = resolve_model_path("smollm2")
    add_model(root, "smollm2:135m", smollm2, template=CHATML_GO_TEMPLATE, license="Apache 2.0",
              params={"stop": ["<|im_start|>", "<|im_end|>"]})
    add_model(root, ASSISTANT_NAME, smollm2, template=CHATML_GO_TEMPLATE, system=ASSISTANT_SYSTEM,
              params=ASSISTANT_PARAMS)
    scratch = root.parent / (root.name + "-gguf")
    scratch.mkdir(exist_ok=True)
    for quant in tiny_quants:
        gguf = write_tiny_gguf(scratch / f"tiny-{quant}.gguf", quant)
        add_model(root, f"tiny:{quant.lower()}", gguf, file_type=quant)
    return root
