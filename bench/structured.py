"""W7 (../shared/WORKLOADS.md): W1 with every second request under a JSON schema, against the
unconstrained W1 in the same process; and the host's cost of the grammars alone.

    python3 bench/structured.py --tokenizer DIR                       # one GPU, Llama-3-8B shape
    python3 bench/structured.py --tokenizer DIR --device cpu --size tiny --num-requests 64
    python3 bench/structured.py --tokenizer DIR --host-only           # mask fill + accept, ms/step

DIR holds HF tokenizer files (the grammar needs a vocabulary). Make one where the bundled
SmolLM2 is installed with `python -c "from tests.tiny_models import smollm2_tokenizer_dir as d;
import shutil; shutil.copytree(d(), 'bench/tokenizer-smollm2')"`. With SmolLM2's 49,152 tokens
under the 128,256-wide 8B shape, ids past the tokenizer are padding a grammar never allows.

What a random model does under W7's schema: inside a string almost every token is allowed, and
the few that close it must be followed by exactly the next key, so a random model stays in the
first string, under a live grammar, for all its output tokens (EOS is ignored, as in W1; a
grammar that completes leaves the rest of the request unconstrained). The run reports the
constrained requests' output tokens, how many of them were sampled under a live grammar (the
engine's own count of masked rows), and how many JSON documents completed (and validated).
The figure is output tokens/s; target: W7 >= 0.9x W1. `--host-only` times the per-step host work
of 128 constrained rows (mask fill + accept, the tokens drawn from the mask) for the per-row loop
this engine had before, and for its `StructuredOutputs` now (with and without the grammar's own
vocabulary). Writes bench/results/structured-*.json.
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS, SHAPES, emit, prompts  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.engine.sequence import Sequence  # noqa: E402
from replica.engine.structured_output import StructuredOutputs, json_schema_ebnf  # noqa: E402
from replica.models.loader import Checkpoint  # noqa: E402
from replica.models.model_config import ModelConfig  # noqa: E402
from replica.models.tokenizer import Tokenizer  # noqa: E402
from replica.sampling_params import SamplingParams, StructuredOutputSpec  # noqa: E402

# W7: an object of 4 fields: a string, an integer, an enum, an array of 1-3 strings
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"},
    "age": {"type": "integer"},
    "kind": {"enum": ["person", "company", "place"]},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "kind", "tags"], "additionalProperties": False}
SPEC = StructuredOutputSpec("json_schema", json.dumps(SCHEMA))
# the 8B shape's 128k vocabulary (the bitmask's width) on a model small enough for a CPU
TINY = dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)


def checkpoint(size: str, tokenizer_dir: Path) -> Checkpoint:
    """Random weights (the loader's `dummy` format, drawn on the engine's device) of a Llama
    shape, with the tokenizer of `tokenizer_dir`."""
    import transformers

    shape = TINY if size == "tiny" else SHAPES[size]
    cfg = transformers.LlamaConfig(max_position_embeddings=8192, **shape).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    return Checkpoint(path=tokenizer_dir, format="dummy", config=ModelConfig.from_hf_dict(cfg))


def is_w7_document(value) -> bool:
    """The schema's check by hand (jsonschema is not installed everywhere this runs)."""
    return (isinstance(value, dict) and set(value) == set(SCHEMA["required"])
            and isinstance(value["name"], str) and type(value["age"]) is int
            and value["kind"] in SCHEMA["properties"]["kind"]["enum"]
            and isinstance(value["tags"], list) and 1 <= len(value["tags"]) <= 3
            and all(isinstance(t, str) for t in value["tags"]))


def sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def run(engine: LLMEngine, reqs: list[list[int]], constrained: bool, out_len: int) -> dict:
    """W1 over `reqs`; with `constrained`, every second request (the even ones) under SCHEMA."""
    is_constrained = [constrained and i % 2 == 0 for i in range(len(reqs))]
    masked_before = engine.structured.num_masked_tokens
    sync(engine)
    t0 = time.perf_counter()
    for i, prompt in enumerate(reqs):
        engine.add_request(str(i), prompt, SamplingParams(
            temperature=0.0, max_tokens=out_len, ignore_eos=True,
            structured_output=SPEC if is_constrained[i] else None))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
    while engine.has_unfinished:
        for out in engine.step():
            for c in out.outputs:
                tokens[int(out.request_id)] += c.new_token_ids
    sync(engine)
    wall_s = time.perf_counter() - t0
    num_out = sum(len(t) for t in tokens.values())
    result = dict(wall_s=round(wall_s, 3), out_tok_per_s=round(num_out / wall_s, 1),
                  req_per_s=round(len(reqs) / wall_s, 2), num_out=num_out)
    if constrained:
        result |= constrained_report(engine, [t for i, t in tokens.items() if is_constrained[i]])
        result["masked_tokens"] = engine.structured.num_masked_tokens - masked_before
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return result


def constrained_report(engine: LLMEngine, outputs: list[list[int]]) -> dict:
    """Replays each constrained output through a fresh matcher: where its grammar completed (an
    end token accepted), and whether the text before it is a valid W7 document."""
    import xgrammar as xgr

    compiled = engine.structured.compile(SPEC)
    num_complete = num_valid = 0
    for token_ids in outputs:
        matcher = xgr.GrammarMatcher(compiled)
        for n, token_id in enumerate(token_ids):
            assert matcher.accept_token(token_id), "a constrained token broke the grammar"
            if matcher.is_terminated():
                num_complete += 1
                try:
                    num_valid += is_w7_document(json.loads(engine.tokenizer.decode(token_ids[:n])))
                except ValueError:
                    pass                    # counted as complete, not valid: a bug to look at
                break
    return dict(constrained_requests=len(outputs),
                constrained_out_tokens=sum(len(t) for t in outputs),
                completed_documents=num_complete, valid_documents=num_valid)


class _PerRowPath:
    """The path this change replaced: a TokenizerInfo as wide as the logits (the padding as
    xgrammar "special tokens"), then one xgrammar call per row for the fill and for the accept."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, num_rows: int):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=vocab_size,
                                                  stop_token_ids=tokenizer.eos_token_ids)
        grammar = xgr.GrammarCompiler(info).compile_grammar(json_schema_ebnf(json.dumps(SCHEMA)))
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(num_rows)]
        self.bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)

    def allowed_mask(self, seqs) -> None:
        for i, matcher in enumerate(self.matchers):
            matcher.fill_next_token_bitmask(self.bitmask, i)

    def accept(self, seqs, token_ids: list[int]) -> None:
        for matcher, token_id in zip(self.matchers, token_ids):
            matcher.accept_token(token_id)


def host_only(tokenizer_dir: Path, num_rows: int, num_steps: int, vocab_size: int,
              fill_threads: int | None) -> None:
    """ms per step of mask fill + accept for `num_rows` rows under W7's schema, three ways, fed
    the same tokens (drawn uniformly from the engine's mask): before (`_PerRowPath`), the
    engine's batched calls over a model-wide vocabulary, and the engine as it is (the grammar
    over the tokenizer's ids, the padding cut by a slice)."""
    tokenizer = Tokenizer.load(tokenizer_dir, "hf", [])
    cpu = torch.device("cpu")
    wide = SimpleNamespace(hf=tokenizer.hf, vocab_size=vocab_size)     # a tokenizer padded to the model
    eos = tokenizer.eos_token_ids
    paths = {"before": _PerRowPath(tokenizer, vocab_size, num_rows),
             "batched_model_vocab": StructuredOutputs(wide, vocab_size, eos, cpu, fill_threads),
             "after": StructuredOutputs(tokenizer, vocab_size, eos, cpu, fill_threads)}
    engine = paths["after"]
    seqs = {name: [Sequence(str(i), [1, 2, 3], SamplingParams(structured_output=SPEC), 0.0)
                   for i in range(num_rows)] for name in paths}
    fill_s, accept_s = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
    gen = torch.Generator().manual_seed(0)
    warmup = 4
    for step in range(num_steps + warmup):
        masks = {}
        for name, path in paths.items():
            t0 = time.perf_counter()
            masks[name] = path.allowed_mask(seqs[name])
            fill_s[name] += (time.perf_counter() - t0) * (step >= warmup)
        logits = torch.rand(num_rows, vocab_size, generator=gen)
        masks["after"].apply(logits)
        token_ids = logits.argmax(dim=-1).tolist()
        for name, path in paths.items():
            for seq, token_id in zip(seqs[name], token_ids):
                seq.token_ids.append(token_id)
            t0 = time.perf_counter()
            path.accept(seqs[name], token_ids)
            accept_s[name] += (time.perf_counter() - t0) * (step >= warmup)
    per_step = {}
    for name in paths:
        per_step[f"{name}_fill_ms"] = round(fill_s[name] / num_steps * 1e3, 3)
        per_step[f"{name}_accept_ms"] = round(accept_s[name] / num_steps * 1e3, 3)
        per_step[f"{name}_ms_per_step"] = round((fill_s[name] + accept_s[name]) / num_steps * 1e3, 3)
    emit("host_fill_accept", rows=num_rows, steps=num_steps, vocab=vocab_size,
         grammar_vocab=engine.grammar_vocab_size, fill_threads=engine.max_threads,
         still_in_grammar=sum(not engine._matcher(s).is_terminated() for s in seqs["after"]), **per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, type=Path, help="folder of HF tokenizer files")
    parser.add_argument("--size", default="8b", choices=sorted(SHAPES) + ["tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="W1 then W7, this many times")
    parser.add_argument("--host-only", action="store_true", help="only the host's mask fill + accept")
    parser.add_argument("--host-rows", type=int, default=128)
    parser.add_argument("--host-steps", type=int, default=64)
    parser.add_argument("--fill-threads", type=int, help="--host-only: xgrammar's fill threads "
                        "(default: the engine's, half the cores, at most 8)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    vocab = (TINY if args.size == "tiny" else SHAPES[args.size])["vocab_size"]
    if args.host_only:
        host_only(args.tokenizer, args.host_rows, args.host_steps, vocab, args.fill_threads)
        return write(Path(args.out) / f"structured-host-{platform.node()}-{datetime.date.today()}.json")
    w7(args, vocab)
    where = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0]
    write(Path(args.out) / f"structured-{where}-{args.size}-{datetime.date.today()}.json")


def w7(args, vocab: int) -> None:
    """W1 unconstrained, then W7, on one engine; the warm-up runs both paths first."""
    on_cpu = args.device == "cpu"
    engine = LLMEngine(EngineConfig(model="bench", device=args.device,
                                    dtype="float32" if on_cpu else "bfloat16",
                                    max_num_batched_tokens=8192, max_num_seqs=256,
                                    max_model_len=4096), checkpoint=checkpoint(args.size, args.tokenizer))
    assert engine.structured is not None, "the tokenizer folder has no tokenizer files"
    n, lengths = args.num_requests, [args.prompt_len] * args.num_requests
    t0 = time.perf_counter()
    engine.structured.compile(SPEC)
    emit("grammar_compile", first_compile_s=round(time.perf_counter() - t0, 3),
         grammar_vocab=engine.structured.grammar_vocab_size, model_vocab=vocab,
         fill_threads=engine.structured.max_threads)
    run(engine, prompts(32, [args.prompt_len] * 32, vocab, 9), True, 16)      # warm-up, both paths
    # W1 and W7 in turn, `rounds` times; each run has its own prompts (no prefix-cache help)
    wall_s = {"W1": 0.0, "W7": 0.0}
    num_out = {"W1": 0, "W7": 0}
    for r in range(args.rounds):
        for name, constrained in (("W1", False), ("W7", True)):
            engine.num_overlapped_steps = 0
            result = run(engine, prompts(n, lengths, vocab, 2 * r + constrained + 2), constrained,
                         args.output_len)
            emit(f"{name}_round{r + 1}", **result, overlapped_steps=engine.num_overlapped_steps)
            wall_s[name] += result["wall_s"]
            num_out[name] += result["num_out"]
    ratio = (num_out["W7"] / wall_s["W7"]) / (num_out["W1"] / wall_s["W1"])
    emit("W7_over_W1", out_tok_per_s_ratio=round(ratio, 3), target=0.9, meets_target=ratio >= 0.9,
         W1_out_tok_per_s=round(num_out["W1"] / wall_s["W1"], 1),
         W7_out_tok_per_s=round(num_out["W7"] / wall_s["W7"], 1))


def write(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
