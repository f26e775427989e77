"""bench/quant_trained.py on the bundled (trained) SmolLM2: the packed GGUF path computes exactly
what bf16 computes on its dequantised weights, and on trained weights Q8_0 stays close to bf16,
which random weights (bench/quant_accuracy.py) could never show."""
import pytest


@pytest.fixture(scope="module")
def x_int8_run():
    """`bench/quant_trained.py --formats Q8_0,Q4_0 --x-int8` on 2 windows of 16 tokens and the
    chat questions: one run, so the bf16 engines (reference and 1 % noise) are built once for both
    formats. --x-int8 rounds only 4-bit projections' x; Q8_0 must come out as without it. The bf16
    reference run (no 4-bit projection: --x-int8 leaves it as it is) also records the output
    head's input for --head-x-int8's figures."""
    from bench.quant_trained import measure, round_x_of_4bit_projections
    from replica.layers import quantized_linear

    plain = quantized_linear.gguf_linear_ref
    round_x_of_4bit_projections()
    try:
        yield measure("smollm2", "cpu", ["Q8_0", "Q4_0"], num_prompts=2, prompt_len=16, head_x=True)
    finally:
        quantized_linear.gguf_linear_ref = plain


def test_q8_0_on_trained_weights_is_exact_on_its_own_weights_and_close_to_bf16(x_int8_run):
    result = x_int8_run
    w1, chat = "rows2", "rows8"          # 2 windows of the Python manual, the 8 chat questions
    same = result["Q8_0"]["vs_same_weights"]
    assert same[w1]["prefill_rel_err"] == 0.0 and same[chat]["prefill_rel_err"] == 0.0
    original = result["Q8_0"]["vs_bf16"][chat]
    assert 0.0 < original["prefill_rel_err"] < 0.06, original
    assert result["noise_floor_1pct"][chat]["prefill_rel_err"] < 0.06


def test_x_rounded_to_int8_moves_the_4_bit_logits_a_little_and_no_further(x_int8_run):
    """--x-int8: the CPU reference with x rounded per 32-element group as the GPU's 4-bit GEMV
    rounds it; against the unrounded product on the same weights it is no longer exact, and stays
    well within what 1 % of weight noise moves."""
    same = x_int8_run["Q4_0"]["vs_same_weights"]["rows8"]
    assert 0.0 < same["prefill_rel_err"] < 0.03, same


def test_the_output_heads_x_rounded_alone_moves_its_logits_a_little(x_int8_run):
    """--head-x-int8: the head's input (recorded in one bf16 run, prefill and first decode step)
    rounded per 32-element group as a 6-bit head's GEMV takes it."""
    result = x_int8_run["head_x_int8_vs_bf16"]
    assert set(result) == {"rows2", "rows8"}
    for step in ("prefill", "decode"):
        assert 0.0 < result["rows8"][f"{step}_rel_err"] < 0.03, result
