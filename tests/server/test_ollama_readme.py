"""README's "Coming from Ollama" examples run as written against a replica serving
`smollm2:135m` from an Ollama store (only the address changes: a free port, not 11434)."""
import contextlib
import io
import json
import re
import shlex
import subprocess

import pytest

from tests.server.conftest import REPO_ROOT, ServerProcess


def _section_blocks(language: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Coming from Ollama", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def server(ollama_store, tmp_path_factory):
    server = ServerProcess(["--model", "smollm2:135m", "--max-model-len", "512",
                            "--num-kv-blocks", "64", "--dtype", "float32"],
                           tmp_path_factory.mktemp("logs") / "smollm2-135m.log",
                           env={"OLLAMA_MODELS": str(ollama_store)})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_readme_python_example_generates_whole_and_streamed(server):
    (code,) = [b for b in _section_blocks("python") if "requests.post" in b]
    code = code.replace("http://localhost:11434", server.url)
    code = code.replace('"prompt": "Why is the sky blue?"',
                        '"prompt": "Why is the sky blue?", "options": {"temperature": 0, "num_predict": 24}')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    whole, streamed = out.getvalue().split("\n", 1)
    assert len(whole) > 20 and streamed == whole         # greedy: the same text both ways


def test_readme_curl_completion_example(server):
    (block,) = [b for b in _section_blocks("bash") if "curl" in b and "/v1/completions" in b]
    command = block.replace("\\\n", " ").replace("http://localhost:11434", server.url)
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    body = json.loads(result.stdout)
    assert body["model"] == "smollm2:135m" and body["usage"]["completion_tokens"] == 20
    assert body["choices"][0]["text"]


def test_the_plain_library_name_is_served_under_its_ollama_name(server):
    import ollama

    client = ollama.Client(host=server.url)
    assert [m.model for m in client.list().models] == ["smollm2:135m"]
    out = client.chat(model="library/smollm2:135m", options={"temperature": 0, "num_predict": 30},
                      messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in out.message.content
    assert client.show("smollm2:135m").license == "Apache 2.0"
