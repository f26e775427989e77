"""CPU throughput of the bundled SmolLM2-135M-Instruct: pagefleet vs transformers `generate`.

    .venv/bin/python bench/cpu.py [--threads 2]

Same process, same fp32 weights (dequantised from the GGUF), 64-token prompts, 128 new tokens
(EOS ignored), batch 1 and batch 16; also pagefleet at its default dtype (bf16 on CPUs with native
bf16). Prints total tokens/s (new tokens over wall time) and writes bench/results/cpu-<date>.json.
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.engine.llm import LLM  # noqa: E402
from replica.models.registry import resolve_model_path  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 64, 128


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(100, 49000, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(n)]


def ours(llm: LLM, batch: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts(batch), params)
    elapsed = time.perf_counter() - start
    assert all(len(r.outputs[0].token_ids) == NEW_TOKENS for r in results)
    return batch * NEW_TOKENS / elapsed


@torch.inference_mode()
def transformers_generate(model, batch: int) -> float:
    ids = torch.tensor(prompts(batch))
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - PROMPT_TOKENS == NEW_TOKENS
    return batch * NEW_TOKENS / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    llm = LLM("smollm2", max_model_len=1024, dtype="float32")
    default_llm = LLM("smollm2", max_model_len=1024)
    ours(llm, 2)                                                    # warm-up
    ours(default_llm, 2)
    gguf = resolve_model_path("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    transformers_generate(hf, 2)
    results = {"env": dict(cpu=platform.processor() or platform.machine(), threads=args.threads,
                           torch=torch.__version__, transformers=transformers.__version__,
                           date=datetime.date.today().isoformat(), default_dtype=str(default_llm.engine.dtype),
                           workload=f"{PROMPT_TOKENS} prompt tokens, {NEW_TOKENS} new tokens, fp32")}
    for batch in (1, 16):
        results[f"batch{batch}"] = {"pagefleet_tok_per_s": round(ours(llm, batch), 1),
                                    "transformers_tok_per_s": round(transformers_generate(hf, batch), 1),
                                    "pagefleet_default_dtype_tok_per_s": round(ours(default_llm, batch), 1)}
        print(json.dumps({f"batch{batch}": results[f"batch{batch}"]}), flush=True)
    b1, b16 = results["batch1"], results["batch16"]
    print(f"\n{'':<10}{'pagefleet':>12}{'transformers':>14}{'ratio':>8}")
    for name, row in (("batch 1", b1), ("batch 16", b16)):
        ratio = row["pagefleet_tok_per_s"] / row["transformers_tok_per_s"]
        print(f"{name:<10}{row['pagefleet_tok_per_s']:>12}{row['transformers_tok_per_s']:>14}{ratio:>7.2f}x")
    print(f"pagefleet batch 16 / batch 1: {b16['pagefleet_tok_per_s'] / b1['pagefleet_tok_per_s']:.1f}x")
    print(f"pagefleet at its default dtype ({default_llm.engine.dtype}): batch 1 "
          f"{b1['pagefleet_default_dtype_tok_per_s']}, batch 16 {b16['pagefleet_default_dtype_tok_per_s']} tok/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu-smollm2-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
