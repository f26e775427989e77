"""bench/quant_trained.py on the bundled (trained) SmolLM2: the packed GGUF path computes exactly
what bf16 computes on its dequantised weights, and on trained weights Q8_0 stays close to bf16,
which random weights (bench/quant_accuracy.py) could never show."""


def test_q8_0_on_trained_weights_is_exact_on_its_own_weights_and_close_to_bf16():
    from bench.quant_trained import measure

    result = measure("smollm2", "cpu", ["Q8_0"], num_prompts=2, prompt_len=16)
    w1, chat = "rows2", "rows8"          # 2 windows of the Python manual, the 8 chat questions
    same = result["Q8_0"]["vs_same_weights"]
    assert same[w1]["prefill_rel_err"] == 0.0 and same[chat]["prefill_rel_err"] == 0.0
    original = result["Q8_0"]["vs_bf16"][chat]
    assert 0.0 < original["prefill_rel_err"] < 0.06, original
    assert result["noise_floor_1pct"][chat]["prefill_rel_err"] < 0.06
