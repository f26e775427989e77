"""Top-1 agreement of the quantised formats with bf16 on a TRAINED model, at W1's prompt shape.

bench/quant_accuracy.py explains why random 8B weights cannot answer issue 15's accuracy
question: they make a chaotic network in which 1 % of weight noise already flips half the top-1
tokens. A trained model is not chaotic, so there "top-1 agreement with bf16" measures what a user
loses. The only trained model this machine holds is the bundled SmolLM2-135M-Instruct (a Q4_1
GGUF): its weights, dequantised to floats, are the bf16 model here, and each format quantises
them again the way the engine does on load:

    fp8    W8A8: e4m3 weights with one scale per output channel (quantised on load, as
           `--quantization fp8` does to a bf16 checkpoint), activations quantised per token
    Q8_0, Q4_K, Q4_0   the projections encoded into GGML blocks by replica.quantization.gguf_quantize
                       and served packed (`--quantization gguf`)

On the CPU the engine runs the torch reference of each format's arithmetic (fp8_linear_ref,
gguf_linear_ref), which the GPU kernels are tested against; `--device cuda` runs the kernels.

    python3 bench/quant_trained.py                      # CPU: 256 x 512-token prompts, ~25 min on 2 cores
    python3 bench/quant_trained.py --num-prompts 16 --prompt-len 64     # a quick look
    python3 bench/quant_trained.py --formats Q4_0 --x-int8   # 4-bit with x rounded to int8 per group
    python3 bench/quant_trained.py --head-x-int8 --num-prompts 64    # the output head's x rounded

--x-int8 rounds every 4-bit projection's input to int8 per 32-element group first, as the GPU's
decode GEMV does for the 4-bit types with a min (`gguf_gemv_x8_triton`; on the CPU the torch
reference of that rounding): the cost of x's rounding on a trained model. SmolLM2's rows allow
Q4_0 only among our 4-bit encoders, and x's rounding error does not depend on W's type.

--head-x-int8 measures the output head's share alone. A 6-bit (Q6_K) head's GEMV on the GPU
takes x rounded to int8 per 32-element group too (one rounding, of the final norm's output), so
only the head's logits move, step by step. One bf16 run records the head's input at the prefill
and first decode steps; the logits of W times x rounded are compared with those of W times x. The
rounding's error does not depend on W's type; SmolLM2's 576-wide rows cannot be Q6_K (256-column
blocks), so W is its trained (tied) head as it is.

Prompts: W1's shape (256 prompts of 512 tokens) cut from natural English, the Python reference
manual's topics that ship with Python (`pydoc_data.topics`), and eight chat questions. Not W1's
random token ids: after 512 random tokens a trained model's next-token distribution is nearly
flat, so top-1 there compares near-ties (a first run: 1 % of weight noise flipped 12.5 % of them,
Q8_0 17 %, and Q4_0 73 % while it kept 7 of the 8 chat answers' first tokens).

Reported per format: top-1 agreement and relative logits error of the prefill step (last prompt
token) and of the first decode step (rows whose first token agreed), against bf16 and against
bf16 running the format's own effective weights (for FP8 also its weight-only case); plus bf16
with 1 % weight noise as a scale. Writes bench/results/quant-trained-<device>-<date>.json.
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quant_accuracy import accuracy, compare, step_logits  # noqa: E402
from bench.vs_llamacpp_report import cpu_model  # noqa: E402
from replica.models.loader import open_checkpoint  # noqa: E402

FORMATS = ("fp8", "Q8_0", "Q4_K", "Q4_0")
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "How many days are in a week?",
             "Write one sentence about the sea.", "What is 12 times 12?", "Who wrote Romeo and Juliet?",
             "Give a synonym for happy.", "What does a thermometer measure?"]


def text_prompts(tok, num: int, length: int) -> list[list[int]]:
    """`num` windows of `length` tokens, spread evenly over the Python manual's topics (113k
    tokens with SmolLM2's tokenizer: 256 windows of 512 overlap by a seventh, and each still ends
    on a token of its own)."""
    from pydoc_data.topics import topics
    ids = tok.encode("\n\n".join(topics[key] for key in sorted(topics)), add_special_tokens=False)
    if len(ids) < length + num - 1:
        raise ValueError(f"the manual holds {len(ids)} tokens: too few for {num} windows of {length}")
    stride = (len(ids) - length) // max(num - 1, 1)
    return [ids[i * stride:i * stride + length] for i in range(num)]


def chat_prompts(tok) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


def trained_inputs(model: str, num_prompts: int, prompt_len: int):
    """(checkpoint, its weights as floats, the two prompt sets, a step budget that prefills a
    whole set in one step, the engines' extra config)."""
    ckpt = open_checkpoint(model)
    weights = [(name, t.float()) for name, t in ckpt.weights()]       # once: every engine starts from these
    from replica.models.tokenizer import Tokenizer
    tok = Tokenizer.load(ckpt.path, ckpt.format, [])
    sets = [text_prompts(tok, num_prompts, prompt_len), chat_prompts(tok)]
    budget = max(8192, max(map(len, sets[1])) * len(sets[1]))
    return ckpt, weights, sets, budget, {"max_model_len": max(prompt_len, 512) + 8}


def measure(model: str, device: str, formats, num_prompts: int, prompt_len: int, head_x: bool = False) -> dict:
    """head_x: also `head_x_rounding`'s figures, recorded in the bf16 reference run (one run fewer)."""
    ckpt, weights, sets, budget, engine_args = trained_inputs(model, num_prompts, prompt_len)
    cfg = ckpt.config
    if "Q4_K" in formats and (cfg.hidden_size % 256 or cfg.intermediate_size % 256):
        # K-quants pack 256 columns a block: SmolLM2-135M's 576-wide rows cannot be Q4_K
        print(f"Q4_K skipped: rows of {cfg.hidden_size} / {cfg.intermediate_size} columns are not "
              "multiples of its 256-column blocks")
        formats = [f for f in formats if f != "Q4_K"]
    head_steps = HeadXRounding()
    results = accuracy(cfg, device, formats, sets, token_budget=budget, base=lambda: iter(weights),
                       engine_args=engine_args, bf16_steps=head_steps if head_x else step_logits)
    return results | ({"head_x_int8_vs_bf16": head_steps.results} if head_x else {})


def round_x_of_4bit_projections() -> None:
    """The CPU reference path with x rounded as the int8-x GEMV rounds it."""
    from replica.kernels.gguf_linear import dequantize_x_ref, quantize_x_ref
    from replica.layers import quantized_linear
    plain = quantized_linear.gguf_linear_ref

    def rounded(x, packed, bias=None):
        if packed.bits == 4:
            codes, dx, _ = quantize_x_ref(x)
            x = dequantize_x_ref(codes, dx).to(x.dtype)
        return plain(x, packed, bias)
    quantized_linear.gguf_linear_ref = rounded


class HeadXRounding:
    """`step_logits` (same arguments and result) that also records the output head's input at
    the prefill and first decode steps, every prompt's row, and keeps per prompt set (`rows<n>`)
    the top-1 agreement and logits error of head(x rounded to int8 per group) against head(x)."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def __call__(self, engine, prompts: list[list[int]]):
        from replica.kernels.gguf_linear import dequantize_x_ref, quantize_x_ref
        model_, execute = engine.runner.model, engine.runner.execute
        head = model_.compute_logits
        rows_of: dict[str, list[torch.Tensor]] = {}
        step_ids: list[str] = []

        def recording_execute(plan, *args, **kwargs):
            step_ids[:] = [seq.request_id for seq, _ in plan.samplers]
            return execute(plan, *args, **kwargs)

        def recording_head(hidden):
            # hidden: [rows that sample this step, hidden], in the plan's sampler order
            if hidden.shape[0] != len(step_ids):
                raise RuntimeError(f"head rows {hidden.shape[0]} != samplers {len(step_ids)}")
            for rid, row in zip(step_ids, hidden):
                rows_of.setdefault(rid, []).append(row.detach().clone())
            return head(hidden)
        engine.runner.execute, model_.compute_logits = recording_execute, recording_head
        try:
            logits = step_logits(engine, prompts)
        finally:
            engine.runner.execute, model_.compute_logits = execute, head
        per_step = {}
        for step, name in enumerate(("prefill", "decode")):
            x = torch.stack([rows_of[str(i)][step] for i in range(len(prompts))])   # [P, hidden]
            codes, dx, _ = quantize_x_ref(x.float())
            got, ref = head(dequantize_x_ref(codes, dx).to(x.dtype)), head(x)
            per_step |= {f"{name}_{k}": v for k, v in compare(got, ref).items()}
        self.results[f"rows{len(prompts)}"] = per_step
        return logits


def head_x_rounding(model: str, device: str, num_prompts: int, prompt_len: int) -> dict:
    """`HeadXRounding`'s figures per prompt set from one bf16 run, x the head's input."""
    from bench.quant_accuracy import build_engine
    ckpt, weights, sets, budget, engine_args = trained_inputs(model, num_prompts, prompt_len)
    engine = build_engine(ckpt.config, "bf16", device, max_num_seqs=max(16, *map(len, sets)), token_budget=budget,
                          engine_args=engine_args, base=lambda: iter(weights))
    head_steps = HeadXRounding()
    for prompts in sets:
        head_steps(engine, prompts)
    return {"head_x_int8_vs_bf16": head_steps.results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a GGUF file or HF folder (trained weights)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--x-int8", action="store_true", help="4-bit projections' x rounded to int8 per group")
    parser.add_argument("--head-x-int8", action="store_true",
                        help="only the output head's x rounded to int8 per group (a Q6_K head's GEMV)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.x_int8:
        round_x_of_4bit_projections()
    if args.head_x_int8:
        results = head_x_rounding(args.model, args.device, args.num_prompts, args.prompt_len)
    else:
        results = measure(args.model, args.device, args.formats.split(","), args.num_prompts, args.prompt_len)
    env = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else cpu_model(),
               num_threads=torch.get_num_threads(),
               torch=torch.__version__, python=platform.python_version(), date=datetime.date.today().isoformat(),
               model=args.model, x_int8=args.x_int8, num_prompts=args.num_prompts, prompt_len=args.prompt_len,
               command="python3 bench/quant_trained.py " + " ".join(sys.argv[1:]))
    names = {f"rows{args.num_prompts}": "text", f"rows{len(QUESTIONS)}": "chat"}
    for name, figures in results.items():
        for key, value in (figures.items() if "vs_bf16" in figures else [("", figures)]):
            key = key.replace("weight_only_vs_bf16", "weight-only")
            for rows, row in value.items():
                print(f"{name:<18}{key:<16}{names.get(rows, rows):<6}{json.dumps(row)}")
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "-headx8" if args.head_x_int8 else ("-x8" if args.x_int8 else "")
    path = out / f"quant-trained-{args.device}{kind}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"env": env, "prompt_sets": names, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
