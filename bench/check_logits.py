"""First-step logits of the engine against transformers on the GPU, per path, dtype and depth.

    python3 bench/check_logits.py

For the Llama-3-8B layer shape at 2 and 32 layers, in float32 and bfloat16: relative error
‖ours − transformers‖ / ‖transformers‖ of the last-token logits of 4 prompts of 512 tokens, for the
Triton path and for the pure-torch path (kernel_backend="torch": every op and attention).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.config import EngineConfig  # noqa: E402
from replica.engine.engine import LLMEngine  # noqa: E402
from replica.models.loader import checkpoint_from_hf_model  # noqa: E402
from bench.engine import exact_rope  # noqa: E402
from replica.sampling_params import SamplingParams  # noqa: E402


def logits_of(hf, prompts, dtype: str, backend: str) -> torch.Tensor:
    # kernel_backend below switches every op and attention together
    engine = LLMEngine(EngineConfig(model="check", device="cuda", dtype=dtype, num_kv_blocks=200,
                                    max_model_len=1024, max_num_batched_tokens=4096, enforce_eager=True,
                                    kernel_backend=backend), checkpoint=checkpoint_from_hf_model(hf))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=1))
    out = engine.runner.execute(engine.scheduler.schedule())
    del engine
    torch.cuda.empty_cache()
    return out


def main() -> None:
    import transformers
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (512,), generator=gen).tolist() for _ in range(4)]
    for layers, dtype in ((2, "float32"), (2, "bfloat16"), (32, "bfloat16")):
        cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                       rope_theta=500000.0, max_position_embeddings=8192)
        torch.manual_seed(0)
        with torch.device("cuda"):
            hf = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
        exact_rope(hf)
        with torch.no_grad():
            ref = hf(torch.tensor(prompts, device="cuda")).logits[:, -1].float()
        row = {"layers": layers, "dtype": dtype}
        outs = {b: logits_of(hf, prompts, dtype, b) for b in ("triton", "torch")}
        for name, out in outs.items():
            row[f"{name}_vs_hf"] = round(((out - ref).norm() / ref.norm()).item(), 6)
            row[f"{name}_top1_agree"] = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        row["triton_vs_torch"] = round(((outs["triton"] - outs["torch"]).norm() / outs["torch"].norm()).item(), 6)
        print(json.dumps(row), flush=True)
        del hf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
