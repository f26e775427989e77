"""`replica generate`: the bundled model answers a question in the terminal, like `ollama run`."""
import subprocess
import sys


def test_generate_answers_with_the_bundled_model():
    result = subprocess.run(
        [sys.executable, "-m", "replica.cli", "generate", "--prompt", "What is the capital of France?",
         "--max-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout


def test_generate_reports_a_missing_model_in_one_line():
    result = subprocess.run([sys.executable, "-m", "replica.cli", "generate", "--model", "/no/such/model",
                             "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("replica: model '/no/such/model' not found")
    assert "Traceback" not in result.stderr
