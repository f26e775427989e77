"""IncrementalDetokenizer with the SmolLM2 byte-level BPE tokenizer: streaming token by token gives
deltas that add up to the full decode and never show a half character (U+FFFD) on the way.
"""
import pytest

from replica.models.tokenizer import IncrementalDetokenizer

TEXTS = {
    "accents": "Héllo wörld, ça va? Naïve café résumé, Ærøskøbing.",
    "cjk": "日本語のテキストと中文混合，한국어도 조금.",
    "emoji": "Party 🎉😀😃 thumbs 👍🏽, family 👨‍👩‍👧‍👦, flags 🇫🇷🇩🇪.",
    "math": "Ω≈ç√∫ µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ",
    "long_mixed": " ".join(["naïve 日本 🎉 Zürich"] * 12),    # longer than the decode window
}


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.step([token_id]) for token_id in output_ids]
    return deltas + [detokenizer.flush()]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_token_by_token_deltas_add_up_to_the_full_decode_without_half_characters(smollm2_tokenizer, name):
    tok = smollm2_tokenizer
    text = TEXTS[name]
    ids = tok.encode(text, add_special_tokens=False)
    if name != "accents":   # the case must really split characters across tokens
        assert any("\ufffd" in tok.decode([i]) for i in ids), "no token ends inside a character"
    deltas = stream(tok, [], ids)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_after_a_prompt_continue_its_text(smollm2_tokenizer, name):
    tok = smollm2_tokenizer
    prompt_ids = tok.encode("Réponse: 🎉 voilà", add_special_tokens=False)
    output_ids = tok.encode(TEXTS[name], add_special_tokens=False)
    deltas = stream(tok, prompt_ids, output_ids)
    assert not any("\ufffd" in delta for delta in deltas)
    full = tok.decode(prompt_ids + output_ids)
    assert "".join(deltas) == full[len(tok.decode(prompt_ids)):]


def test_a_character_cut_off_at_the_end_is_held_back_then_flushed(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("ok 😀", add_special_tokens=False)
    # drop the token(s) that complete the emoji: the stream ends inside the character
    cut = next(n for n in range(len(ids) - 1, 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tok, [])
    streamed = "".join(detokenizer.step([t]) for t in ids[:cut])
    assert streamed == "ok"         # " " + the emoji's first bytes are one token, held back
    rest = detokenizer.flush()
    assert rest.endswith("\ufffd")
    assert streamed + rest == tok.decode(ids[:cut])
