"""W3 offline A/B in one process (one H200, 8B shape, dummy weights): the prefill kernel of .gpu/old_prefill.py
(`git show 36ebe0b:replica/kernels/paged_prefill_triton.py`, grid B x tiles of the longest query) against
this commit's flat grid. `python3 bench/prefill_grid_ab.py` on the device; results in bench/NOTES.md."""
import importlib.util, sys, time, torch
sys.path.insert(0, "bench")
import engine as eb
from replica.config import EngineConfig
from replica.engine.engine import LLMEngine
import replica.kernels.triton_backend as tb

spec = importlib.util.spec_from_file_location("old_prefill", ".gpu/old_prefill.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
new_forward = tb.TritonAttentionBackend.forward
def old_forward(self, q, k, v, meta, scale):
    if meta.is_decode_only:
        return new_forward(self, q, k, v, meta, scale)
    return old.paged_prefill_attention(q, k, v, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                       meta.max_query_len, scale)

engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16", max_num_batched_tokens=8192,
                                max_num_seqs=256, max_model_len=4096), checkpoint=eb.random_checkpoint("8b"))
vocab = engine.model_config.vocab_size
gen = torch.Generator().manual_seed(0)
in_lens = torch.randint(64, 1025, (1000,), generator=gen).tolist()
out_lens = torch.randint(16, 513, (1000,), generator=gen).tolist()
passes = [("warm-old", old_forward), ("warm-new", new_forward), ("old", old_forward), ("new", new_forward),
          ("old", old_forward), ("new", new_forward)]
for i, (name, fwd) in enumerate(passes):
    tb.TritonAttentionBackend.forward = fwd
    n = 100 if name.startswith("warm") else 1000
    reqs = list(zip(eb.prompts(n, in_lens[:n], vocab, 1000 + i), out_lens[:n]))   # own prompts: no prefix hits
    r = eb.run(engine, reqs)
    print(name, "W3 req/s", round(n / r["wall_s"], 2), "busy", round(r["gpu_busy_share"], 3), "steps", r["steps"], flush=True)
