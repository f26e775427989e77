"""Which part of the bf16 path drifts from an fp32 reference on the GPU (8B layer shape)."""
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


def ours(hf, prompts, device, backend="torch", **cfg):
    # kernel_backend below switches every op and attention together
    engine = LLMEngine(EngineConfig(model="d", device=device, dtype="bfloat16", num_kv_blocks=200, max_model_len=1024,
                                    max_num_batched_tokens=4096, enforce_eager=True, kernel_backend=backend),
                       checkpoint=checkpoint_from_hf_model(hf))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=1))
    out = engine.runner.execute(engine.scheduler.schedule()).float().cpu()
    del engine
    return out


def main():
    import transformers
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (256,), generator=gen).tolist() for _ in range(2)]
    for layers in (1, 2):
        cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                       rope_theta=500000.0, max_position_embeddings=8192)
        torch.manual_seed(0)
        with torch.device("cuda"):
            hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        exact_rope(hf)
        ids = torch.tensor(prompts, device="cuda")
        with torch.no_grad():
            hf16 = hf(ids).logits[:, -1].float().cpu()
            hf.float()
            exact_rope(hf)
            truth = hf(ids).logits[:, -1].float().cpu()
            hf.to(torch.bfloat16)
            exact_rope(hf)

        def rel(x):
            return round(((x - truth).norm() / truth.norm()).item(), 5)
        row = {"layers": layers, "hf_bf16": rel(hf16), "ours_gpu_torch": rel(ours(hf, prompts, "cuda")),
               "ours_gpu_triton": rel(ours(hf, prompts, "cuda", "triton"))}
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        row["ours_gpu_torch_no_reduced_reduction"] = rel(ours(hf, prompts, "cuda"))
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            row["ours_gpu_torch_sdpa_math"] = rel(ours(hf, prompts, "cuda"))
        hf.cpu()
        row["ours_cpu_torch"] = rel(ours(hf, prompts, "cpu"))
        print(json.dumps(row), flush=True)
        del hf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
