"""Host time per engine step for W3-like batches, on the CPU, with the model's compute stubbed out.

The forward pass and the logits are replaced by zero tensors of the right shapes, so what is left
of `engine.step()` is the host's own work: scheduling, building the step's inputs, launching the
sampler, reading the tokens back and the stop checks. On a GPU this work overlaps the device's
(issue 11), but it bounds how small a step can get and it is what the persistent batch trims.

    PYTHONPATH=$PWD .venv/bin/python bench/host_step.py            # W3-like: 256 rows, budget 8192
    PYTHONPATH=$PWD .venv/bin/python bench/host_step.py --sampled-share 0.5   # half the rows sample

Prints one JSON line: mean and median host ms per step over decode-only steps and mixed steps.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.models.loader import Checkpoint  # noqa: E402
from replica.models.model_config import ModelConfig  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_theta=10000.0, eos_token_id=2, bos_token_id=1)


def stub_compute(engine: LLMEngine) -> None:
    """Forward and logits become zero tensors: only host work is left in a step."""
    model = engine.runner.model
    hidden, vocab = model.cfg.hidden_size, model.cfg.vocab_size

    def forward(input_ids, positions, meta, kv_caches):
        return torch.zeros(input_ids.shape[0], hidden, dtype=model.dtype)

    def compute_logits(h):
        return torch.zeros(h.shape[0], vocab, dtype=torch.float32)

    model.forward = forward
    model.compute_logits = compute_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--steps", type=int, default=400, help="steps timed (after 20 warm-up steps)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--sampled-share", type=float, default=0.0,
                        help="share of requests with temperature 0.8, top_p 0.9 (W3 itself is greedy)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = Checkpoint(path=None, format="dummy", config=ModelConfig.from_hf_dict(TINY))
    engine = LLMEngine(EngineConfig(model="bench", device="cpu", dtype="float32", max_model_len=4096,
                                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.token_budget,
                                    num_kv_blocks=args.max_num_seqs * 100), checkpoint=checkpoint)
    stub_compute(engine)
    gen = torch.Generator().manual_seed(0)
    in_lens = torch.randint(64, 1025, (args.requests,), generator=gen).tolist()
    out_lens = torch.randint(16, 513, (args.requests,), generator=gen).tolist()
    num_sampled = int(args.sampled_share * args.requests)
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens)):
        prompt = torch.randint(10, 500, (n_in,), generator=gen).tolist()
        params = (SamplingParams(temperature=0.8, top_p=0.9, max_tokens=n_out, ignore_eos=True, seed=i)
                  if i < num_sampled else SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True))
        engine.add_request(str(i), prompt, params)
    decode_ms, mixed_ms, rows = [], [], []
    for step in range(20 + args.steps):
        if not engine.has_unfinished:
            break
        num_running = len(engine.scheduler.running)
        # a decode-only step: every running row has one token to compute (two with a placeholder)
        # and no waiting request is admitted (the running set is full)
        is_decode = num_running == args.max_num_seqs and all(
            s.num_uncomputed_tokens <= 2 for s in engine.scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        dt = (time.perf_counter() - t0) * 1e3
        if step >= 20:
            (decode_ms if is_decode else mixed_ms).append(dt)
            rows.append(num_running)

    def summary(values):
        return dict(steps=len(values), mean_ms=round(statistics.fmean(values), 3),
                    p50_ms=round(statistics.median(values), 3)) if values else dict(steps=0)

    print(json.dumps({"what": "host_ms_per_step", "sampled_share": args.sampled_share,
                      "mean_running_rows": round(statistics.fmean(rows), 1) if rows else 0,
                      "all": summary(decode_ms + mixed_ms), "decode_only": summary(decode_ms),
                      "mixed": summary(mixed_ms)}), flush=True)


if __name__ == "__main__":
    main()
