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
of 128 constrained rows (mask fill + accept, the tokens drawn from the mask) for the engine's
`StructuredOutputs` and for the per-row loop it replaced. Writes bench/results/structured-*.json.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS, SHAPES, emit, prompts  # noqa: E402
from replica.engine.structured_output import StructuredOutputs, json_schema_ebnf  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.engine.sequence import Sequence  # noqa: E402
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
                text = engine.tokenizer.decode(token_ids[:n])
                num_valid += is_w7_document(json.loads(text))
                break
    return dict(constrained_requests=len(outputs),
                constrained_out_tokens=sum(len(t) for t in outputs),
                completed_documents=num_complete, valid_documents=num_valid)


def host_only(tokenizer_dir: Path, num_rows: int, num_steps: int, vocab_size: int) -> None:
    """ms per step of mask fill + accept for `num_rows` rows under W7's schema: the engine's
    StructuredOutputs against the per-row loop it replaced (model-wide vocabulary, one xgrammar
    call per row), both fed the same tokens (drawn uniformly from the engine's mask)."""
    import xgrammar as xgr

    tokenizer = Tokenizer.load(tokenizer_dir, "hf", [])
    eos = tokenizer.eos_token_ids
    structured = StructuredOutputs(tokenizer, vocab_size, eos, torch.device("cpu"))
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams(structured_output=SPEC), 0.0)
            for i in range(num_rows)]
    # the replaced path: TokenizerInfo as wide as the logits, then a Python loop over the rows
    info = xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=vocab_size, stop_token_ids=eos)
    old_grammar = xgr.GrammarCompiler(info).compile_grammar(json_schema_ebnf(json.dumps(SCHEMA)))
    old_matchers = [xgr.GrammarMatcher(old_grammar) for _ in seqs]
    old_bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)
    gen = torch.Generator().manual_seed(0)
    timings = {"engine fill": 0.0, "engine accept": 0.0, "per-row fill": 0.0, "per-row accept": 0.0}
    warmup = 4
    for step in range(num_steps + warmup):
        t0 = time.perf_counter()
        mask = structured.allowed_mask(seqs)
        t1 = time.perf_counter()
        for i, matcher in enumerate(old_matchers):
            matcher.fill_next_token_bitmask(old_bitmask, i)
        t2 = time.perf_counter()
        logits = torch.rand(num_rows, vocab_size, generator=gen)
        mask.apply(logits)
        token_ids = logits.argmax(dim=-1).tolist()
        for seq, token_id in zip(seqs, token_ids):
            seq.token_ids.append(token_id)
        t3 = time.perf_counter()
        structured.accept(seqs, token_ids)
        t4 = time.perf_counter()
        for matcher, token_id in zip(old_matchers, token_ids):
            matcher.accept_token(token_id)
        t5 = time.perf_counter()
        if step >= warmup:
            for key, dt in zip(timings, (t1 - t0, t4 - t3, t2 - t1, t5 - t4)):
                timings[key] += dt
    per_step = {k.replace(" ", "_") + "_ms": round(v / num_steps * 1e3, 3) for k, v in timings.items()}
    before = per_step["per-row_fill_ms"] + per_step["per-row_accept_ms"]
    after = per_step["engine_fill_ms"] + per_step["engine_accept_ms"]
    emit("host_fill_accept", rows=num_rows, steps=num_steps, vocab=vocab_size,
         grammar_vocab=structured.grammar_vocab_size, fill_threads=structured.max_threads,
         still_in_grammar=sum(not structured._matcher(s).is_terminated() for s in seqs),
         before_ms_per_step=round(before, 3), after_ms_per_step=round(after, 3), **per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, type=Path, help="folder of HF tokenizer files")
    parser.add_argument("--size", default="8b", choices=sorted(SHAPES) + ["tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--host-only", action="store_true", help="only the host's mask fill + accept")
    parser.add_argument("--host-rows", type=int, default=128)
    parser.add_argument("--host-steps", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    vocab = (TINY if args.size == "tiny" else SHAPES[args.size])["vocab_size"]
    if args.host_only:
        host_only(args.tokenizer, args.host_rows, args.host_steps, vocab)
        return
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
    # different prompts of the same shape: the second run must not find the first in the prefix cache
    plain = run(engine, prompts(n, lengths, vocab, 2), False, args.output_len)
    emit("W1_unconstrained", **plain)
    engine.num_overlapped_steps = 0
    mixed = run(engine, prompts(n, lengths, vocab, 3), True, args.output_len)
    emit("W7_half_json_schema", **mixed, overlapped_steps=engine.num_overlapped_steps)
    ratio = mixed["out_tok_per_s"] / plain["out_tok_per_s"]
    emit("W7_over_W1", out_tok_per_s_ratio=round(ratio, 3), target=0.9, meets_target=ratio >= 0.9)
    where = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0] if not on_cpu else "cpu"
    out = Path(args.out) / f"structured-{where}-{args.size}-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
