"""Sampler: greedy, the top-k/top-p/min-p masks against a per-row reference, penalties against a
hand computation, min_tokens, temperature statistics, and seeds that ignore batch company
(directly, and through the real LLM on a tiny model).
"""
import math

import torch

from replica.engine.sampler import Sampler, apply_min_p, apply_top_k_top_p
from replica.engine.sequence import Sequence
from replica.sampling_params import SamplingParams

EOS = 2


def make_sampler(vocab_size: int, seed: int = 0) -> Sampler:
    return Sampler(vocab_size, [EOS], seed, torch.device("cpu"))


def make_seq(params: SamplingParams, prompt=(1, 3), output=()) -> Sequence:
    seq = Sequence("r", list(prompt), params, arrival_s=0.0)
    seq.token_ids += list(output)
    if params.seed is not None:
        seq.generator = torch.Generator().manual_seed(params.seed)
    return seq


def test_greedy_takes_the_argmax_of_every_row():
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    seqs = [make_seq(SamplingParams(temperature=0.0)) for _ in range(6)]
    tokens, logprobs = make_sampler(64).sample(logits, seqs)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 6


# ---- masks against a per-row reference ----------------------------------------------------------
def reference_top_k_top_p(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Keep the k best tokens (all if k == 0), then the smallest prefix of them, best first, whose
    renormalised probability reaches p. Returns the kept token ids."""
    order = sorted(range(len(row)), key=lambda i: -row[i].item())
    kept = order[:k] if k > 0 else order
    weights = [math.exp(row[i].item() - row[kept[0]].item()) for i in kept]
    total = sum(weights)
    nucleus, mass = [], 0.0
    for token, weight in zip(kept, weights):
        if mass >= p:
            break
        nucleus.append(token)
        mass += weight / total
    return torch.tensor(sorted(nucleus))


def test_top_k_top_p_mask_matches_a_per_row_reference():
    gen = torch.Generator().manual_seed(1)
    cases = [(k, p) for k in (0, 1, 3, 10, 50) for p in (1.0, 0.95, 0.6, 0.2, 0.01)]
    logits = torch.randn(len(cases), 50, generator=gen) * 2
    masked = apply_top_k_top_p(logits, [k for k, _ in cases], [p for _, p in cases])
    for row, (k, p) in enumerate(cases):
        kept = torch.isfinite(masked[row]).nonzero().flatten()
        assert kept.tolist() == reference_top_k_top_p(logits[row], k, p).tolist(), f"top_k={k} top_p={p}"
        assert torch.equal(masked[row, kept], logits[row, kept]), "kept logits are unchanged"


def test_top_p_of_one_masks_nothing_even_far_below_float32_resolution():
    logits = torch.tensor([[20.0, 0.0, 0.0, 0.0, 0.0]])     # p(token 1..4) ~ 2e-9 each
    masked = apply_top_k_top_p(logits, [3], [1.0])
    assert torch.isfinite(masked[0]).tolist() == [True, True, True, False, False]


def test_min_p_mask_matches_a_per_row_reference():
    gen = torch.Generator().manual_seed(2)
    min_ps = [0.0, 0.01, 0.1, 0.3, 0.9, 1.0]
    probs = torch.softmax(torch.randn(len(min_ps), 40, generator=gen) * 2, dim=-1)
    got = apply_min_p(probs, min_ps)
    for row, min_p in enumerate(min_ps):
        keep = probs[row] >= min_p * probs[row].max()
        expected = torch.where(keep, probs[row], torch.zeros(()))
        torch.testing.assert_close(got[row], expected / expected.sum(), msg=f"min_p={min_p}")
    assert (got[-1] > 0).sum() == 1, "min_p=1 keeps only the most likely token"


# ---- penalties and min_tokens -------------------------------------------------------------------
LOGITS = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.5]
PROMPT = [1, 3, 3]          # token 1 only in the prompt
OUTPUT = [3, 5, 5, 5]       # token 3 once and token 5 three times in the output


def test_repetition_penalty_follows_transformers_on_prompt_and_output_tokens():
    from transformers import RepetitionPenaltyLogitsProcessor

    seq = make_seq(SamplingParams(temperature=0.0, repetition_penalty=2.0), PROMPT, OUTPUT)
    got = make_sampler(8)._apply_penalties(torch.tensor([LOGITS]), [seq])
    # tokens 1, 3 and 5 were seen: positive logits are divided, negative ones multiplied
    expected = [1.0, 1.0, -1.0, 0.25, 3.0, -4.0, 0.0, 1.5]
    assert got[0].tolist() == expected
    hf = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([PROMPT + OUTPUT]), torch.tensor([LOGITS]))
    assert hf[0].tolist() == expected


def test_presence_and_frequency_penalties_follow_openai_on_output_tokens_only():
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    seq = make_seq(params, PROMPT, OUTPUT)
    got = make_sampler(8)._apply_penalties(torch.tensor([LOGITS]), [seq])
    # logit - count * frequency - (count > 0) * presence; the prompt-only token 1 is untouched
    expected = list(LOGITS)
    expected[3] = 0.5 - 1 * 0.25 - 0.5
    expected[5] = -2.0 - 3 * 0.25 - 0.5
    assert got[0].tolist() == expected


def test_penalties_can_turn_the_greedy_choice():
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    logits = torch.tensor([LOGITS])
    logits[0, 5] = 8.0              # the best token, but the output repeated it three times
    sampler = make_sampler(8)
    assert sampler.sample(logits, [make_seq(SamplingParams(temperature=0.0), PROMPT, OUTPUT)])[0] == [5]
    # 8 / 2 - 3 * 0.25 - 0.5 = 2.75 < 3.0, token 4's untouched logit
    assert sampler.sample(logits, [make_seq(params, PROMPT, OUTPUT)])[0] == [4]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 7.0, 0.0, 0.0]])     # EOS (2), then 4, then 5
    sampler = make_sampler(8)

    def greedy(num_output_tokens: int, **params) -> int:
        params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4], **params)
        return sampler.sample(logits, [make_seq(params, output=[6] * num_output_tokens)])[0][0]

    assert greedy(0) == 5           # EOS and the stop token 4 are masked
    assert greedy(2) == 5
    assert greedy(3) == EOS         # min_tokens reached
    assert greedy(0, ignore_eos=True) == EOS, "with ignore_eos, EOS is an ordinary token"


# ---- temperature statistics ---------------------------------------------------------------------
def test_temperature_sampling_draws_from_softmax_of_logits_over_temperature():
    num_draws, temperature = 20_000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 2.0])
    seqs = [make_seq(SamplingParams(temperature=temperature)) for _ in range(num_draws)]
    tokens, _ = make_sampler(6, seed=1234).sample(logits.expand(num_draws, -1).clone(), seqs)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=6).double() / num_draws
    expected = torch.softmax(logits.double() / temperature, dim=0)
    # six standard errors of a frequency: deterministic given the seed, and ~1e-9 to fail by chance
    tolerance = 6 * (expected * (1 - expected) / num_draws).sqrt()
    assert ((frequencies - expected).abs() <= tolerance).all(), (frequencies, expected)
    # the check can tell temperatures apart: at T=1 the frequencies would be far outside it
    at_one = torch.softmax(logits.double(), dim=0)
    assert ((frequencies - at_one).abs() > 3 * tolerance).any()


# ---- seeds ---------------------------------------------------------------------------------------
def _seeded_tokens(logits: torch.Tensor, company: list[SamplingParams], num_steps: int = 8) -> list[int]:
    """Tokens drawn for a seed-42 request, batched (at row 1 when there is company) with others."""
    sampler = make_sampler(logits.shape[1], seed=7)
    me = make_seq(SamplingParams(temperature=0.9, top_p=0.9, seed=42))
    others = [make_seq(p) for p in company]
    seqs = others[:1] + [me] + others[1:]
    drawn = []
    for _ in range(num_steps):
        rows = torch.cat([logits] * len(seqs))
        tokens, _ = sampler.sample(rows, seqs)
        drawn.append(tokens[seqs.index(me)])
    return drawn


def test_a_seeded_request_draws_the_same_tokens_alone_or_in_any_batch():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(3))
    alone = _seeded_tokens(logits, [])
    company = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=5, seed=1),
               SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, min_p=0.1)]
    assert _seeded_tokens(logits, company) == alone
    assert _seeded_tokens(logits, company[::-1]) == alone
    assert len(set(alone)) > 1, "the draws are random, not a fixed choice"


def test_seeded_generation_through_the_llm_ignores_batch_company(token_llm):
    prompt = [5, 17, 99, 240, 31]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = token_llm.generate([prompt], seeded)[0].outputs[0].token_ids
    others = [([7, 8, 9], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)),
              ([300] * 20, SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=6)),
              ([11, 12], SamplingParams(temperature=0.0, max_tokens=9))]
    prompts = [p for p, _ in others[:2]] + [prompt] + [others[2][0]]
    params = [p for _, p in others[:2]] + [seeded] + [others[2][1]]
    batched = token_llm.generate(prompts, params)[2].outputs[0].token_ids
    assert batched == alone
    other_seed = SamplingParams(temperature=1.0, seed=4321, max_tokens=12, ignore_eos=True)
    assert token_llm.generate([prompt], other_seed)[0].outputs[0].token_ids != alone
