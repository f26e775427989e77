"""Per-request sampling over a batch of logits rows.

Order, as transformers and vLLM apply it: penalties and min_tokens masking on the raw logits,
then greedy rows take the argmax; the others are divided by their temperature, cut by top-k,
top-p and min-p, and sampled. Sampling uses the exponential race (argmax of p / E with
E ~ Exp(1)), which draws from p; a seeded request draws E from its own generator, so its tokens
do not depend on which other requests share the batch. Reported logprobs are those of the raw
model distribution (before penalties and temperature), as vLLM reports them.
"""
import torch

from replica.engine.sequence import Sequence
from replica.engine.structured_output import apply_allowed_mask
from replica.outputs import TokenLogprob


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device: torch.device):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], allowed_mask=None
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        # logits: [S, V] float32, one row per sequence in `seqs`
        # allowed_mask: None, or structured outputs' (bitmask, constrained rows)
        num_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if any(n is not None for n in num_logprobs) else None)
        if allowed_mask is not None:      # structured outputs: forbidden tokens → -inf
            logits = logits.clone()
            apply_allowed_mask(logits, allowed_mask)
        logits = self._apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            sampled = self._sample_random(logits.index_select(0, rows), [seqs[i] for i in random_rows])
            tokens = tokens.index_copy(0, rows, sampled)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for i, n in enumerate(num_logprobs):
                if n is not None:
                    logprobs[i] = _token_logprob(raw_logprobs[i], token_list[i], n)
        return token_list, logprobs

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        needs = [i for i, s in enumerate(seqs)
                 if s.params.has_penalties or s.num_output_tokens < s.params.min_tokens]
        if not needs:
            return logits
        logits = logits.clone()
        for i in needs:
            seq, p, row = seqs[i], seqs[i].params, logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device, dtype=torch.long)
                values = row[seen]
                row[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                        values * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
                out = torch.tensor(seq.output_token_ids, device=row.device, dtype=torch.long)
                counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if seq.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                if banned:
                    row[torch.tensor(sorted(banned), device=row.device)] = float("-inf")
        return logits

    def _sample_random(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
        logits = logits / temperature[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = [s.params.min_p for s in seqs]
        if any(m > 0 for m in min_p):
            probs = apply_min_p(probs, min_p)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_(
                generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        noise.clamp_(min=1e-30)         # a zero draw would turn a masked 0/0 into NaN
        return (probs / noise).argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Masks (to -inf) every token outside each row's top-k and top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)
    remove = ranks[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    p = torch.tensor(top_p, device=logits.device, dtype=logits.dtype)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens before it already reach top_p (the first token always stays)
    before = probs.cumsum(dim=-1) - probs
    # top_p == 1 keeps everything: `before` can round up to 1.0 far below float32 resolution
    sorted_logits = sorted_logits.masked_fill((before >= p[:, None]) & (p[:, None] < 1.0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    threshold = torch.tensor(min_p, device=probs.device, dtype=probs.dtype)[:, None] * probs.max(
        dim=-1, keepdim=True).values
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _token_logprob(row: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    top = []
    if num_top > 0:
        values, ids = row.topk(num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(row[token_id]), top)
