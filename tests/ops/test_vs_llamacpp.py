"""bench/vs_llamacpp.py's pure parts: the llama-server settings it claims, the ratios, merging rows."""
import json
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import vs_llamacpp  # noqa: E402


def _args(**kw) -> Namespace:
    base = dict(llama_server="llama-server", gguf=Path("m.gguf"), device="cpu", threads=2,
                concurrency=[1, 16], slot_ctx=1600, one_slot_max_concurrency=1)
    return Namespace(**(base | kw))


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_ollama_defaults_are_one_slot_4096_context_no_flash_attention():
    cmd = vs_llamacpp.llama_server_cmd(_args(), "ollama_defaults", 9000)
    assert (_flag(cmd, "--parallel"), _flag(cmd, "-c"), _flag(cmd, "-b"), _flag(cmd, "-fa")) == \
        ("1", "4096", "512", "off")
    assert _flag(cmd, "-ngl") == "0" and _flag(cmd, "-t") == "2"


def test_tuned_llama_server_has_a_slot_per_stream_of_slot_ctx_each_on_the_gpu():
    cmd = vs_llamacpp.llama_server_cmd(_args(device="cuda", concurrency=[1, 8, 32, 128]), "llamacpp_best", 9000)
    assert _flag(cmd, "--parallel") == "128" and _flag(cmd, "-c") == str(128 * 1600)
    assert _flag(cmd, "-fa") == "on" and "-cb" in cmd and _flag(cmd, "-ngl") == "999"


def test_ratios_divide_pagefleet_by_each_llama_config_and_skip_unrun_rows():
    row = dict(req_per_s=1.0, out_tok_per_s=10.0, ttft_ms_p50=100.0, ttft_ms_p99=200.0,
               itl_ms_p50=10.0, itl_ms_p99=20.0)
    servers = {"pagefleet": {"runs": {"W2": {k: v * 2 for k, v in row.items()}, "W4_c16": row}},
               "ollama_defaults": {"runs": {"W2": row, "W4_c16": {"skipped": "one slot"}}}}
    out = vs_llamacpp.ratios(servers)
    assert out == {"pagefleet_over_ollama_defaults": {"W2": {k: 2.0 for k in row}}}


def test_earlier_rows_fill_servers_not_run_now(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("[ollama_defaults] llama-server ...\n" + json.dumps(
        {"server": "ollama_defaults", "workload": "W2", "out_tok_per_s": 11.0}) + "\n")
    servers = {"pagefleet": {"runs": {}}}
    runs = [("W2", 1, []), ("W4_c16", 16, [])]
    vs_llamacpp.merge_earlier_rows(_args(earlier_rows=rows), servers, runs)
    got = servers["ollama_defaults"]["runs"]
    assert got["W2"] == {"out_tok_per_s": 11.0} and "skipped" in got["W4_c16"]


def test_prompt_ids_stay_below_the_pagefleet_folders_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    Tokenizer(WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    assert vs_llamacpp.tokenizer_size(str(tmp_path)) == 300
    assert vs_llamacpp.tokenizer_size(None) is None and vs_llamacpp.tokenizer_size(str(tmp_path / "none")) is None


def test_a_server_that_does_not_start_leaves_the_other_rows_written_and_exits_1(tmp_path):
    # On the GPU machine pagefleet's server once failed to start after llama-server's rows were
    # measured, and the traceback took them with it. A real `replica serve` on a missing model.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"server": "llamacpp_best", "workload": "W2", "out_tok_per_s": 5.0}) + "\n")
    code = vs_llamacpp.main(["--llama-server", "/bin/false", "--gguf", "smollm2", "--device", "cpu",
                             "--servers", "pagefleet", "--pagefleet-model", str(tmp_path / "missing"),
                             "--concurrency", "1", "--num-requests", "1", "--earlier-rows", str(rows),
                             "--out", str(tmp_path)])
    assert code == 1
    [written] = tmp_path.glob("vs-llamacpp-*.json")
    servers = json.loads(written.read_text())["servers"]
    assert servers["llamacpp_best"]["runs"]["W2"]["out_tok_per_s"] == 5.0
    assert servers["pagefleet"]["runs"] == {} and "exited" in servers["pagefleet"]["error"]
    assert str(tmp_path / "missing") in servers["pagefleet"]["command"]
