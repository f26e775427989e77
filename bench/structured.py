"""Structured outputs' cost on one GPU: W1 (256 prompts of 512 tokens, 128 output tokens each)
unconstrained, then W1 with half of the requests under a JSON schema, in the same process.

    python3 bench/structured.py --tokenizer DIR          # Llama-3-8B shape, random bf16 weights
    python3 bench/structured.py --tokenizer DIR --size 1b

DIR holds HF tokenizer files (the grammar needs a vocabulary; ids past the tokenizer's are
never allowed under a grammar). Make one where the bundled SmolLM2 is installed with
`python -c "from tests.tiny_models import smollm2_tokenizer_dir as d; import shutil;
shutil.copytree(d(), 'bench/tokenizer-smollm2')"`.
Target: the mixed run's output tokens/s >= 90% of the unconstrained run's. Writes
bench/results/structured-<gpu>-<date>.json.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES, emit, prompts, random_checkpoint, RESULTS  # noqa: E402
from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.models.loader import Checkpoint  # noqa: E402
from replica.sampling_params import SamplingParams, StructuredOutputSpec  # noqa: E402

# Unbounded strings in an array: a random model stays inside the grammar for all 128 tokens,
# so the mask is computed and applied at every step of every constrained request.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "tags"], "additionalProperties": False}


def run(engine: LLMEngine, reqs: list[list[int]], num_constrained: int, out_len: int) -> dict:
    spec = StructuredOutputSpec("json_schema", json.dumps(SCHEMA))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, prompt in enumerate(reqs):
        constrained = i % 2 == 0 and i // 2 < num_constrained
        engine.add_request(str(i), prompt, SamplingParams(
            temperature=0.0, max_tokens=out_len, ignore_eos=True,
            structured_output=spec if constrained else None))
    num_out = 0
    while engine.has_unfinished:
        for out in engine.step():
            num_out += sum(len(c.new_token_ids) for c in out.outputs)
    torch.cuda.synchronize()
    wall_s = time.perf_counter() - t0
    return dict(wall_s=round(wall_s, 2), out_tok_per_s=round(num_out / wall_s, 1),
                req_per_s=round(len(reqs) / wall_s, 2), num_out=num_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder of HF tokenizer files")
    parser.add_argument("--size", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    dummy = random_checkpoint(args.size)
    checkpoint = Checkpoint(path=Path(args.tokenizer), format="dummy", config=dummy.config)
    engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16",
                                    max_num_batched_tokens=8192, max_num_seqs=256,
                                    max_model_len=4096), checkpoint=checkpoint)
    assert engine.structured is not None, "the tokenizer folder has no tokenizer files"
    vocab = engine.model_config.vocab_size
    n = args.num_requests
    t0 = time.perf_counter()
    engine.structured.compile(StructuredOutputSpec("json_schema", json.dumps(SCHEMA)))
    emit("grammar_compile", first_compile_s=round(time.perf_counter() - t0, 3))
    run(engine, prompts(32, [512] * 32, vocab, 9), 16, 16)                      # warm-up, both paths
    # different prompts of the same shape: the second run must not find the first in the prefix cache
    plain = run(engine, prompts(n, [512] * n, vocab, 2), 0, 128)
    emit("W1_unconstrained", **plain)
    mixed = run(engine, prompts(n, [512] * n, vocab, 3), n // 2, 128)
    emit("W1_half_json_schema", **mixed)
    ratio = mixed["out_tok_per_s"] / plain["out_tok_per_s"]
    emit("W1_ratio", mixed_over_unconstrained=round(ratio, 3), target=0.9, meets_target=ratio >= 0.9)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0]
    out = Path(args.out) / f"structured-{gpu}-{args.size}-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
