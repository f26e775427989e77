"""Ollama's Go chat templates → Jinja chat templates, for the common prompt formats.

A GGUF file usually carries its own Jinja `tokenizer.chat_template`, which is used first. When it
has none, Ollama's template layer (a Go `text/template`) is the only description of the prompt
format. Go templates cannot be run here, so the family is recognised by its special tokens and
the matching Jinja template below is used; these are written from each family's documented
prompt format, not translated line by line. A template of no known family is refused with a
message that names the model, rather than guessed.

Invariant: each template writes the BOS token itself where the family wants one (the tokenizer
then encodes with `add_special_tokens=False`).
"""

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# Mistral's instruct format: the system message goes in front of the last user turn.
_MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% if ns.system and loop.last %}{{ ns.system }}\n\n{% endif %}{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

_GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

_PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# (family, the markers that identify it in a Go template, the Jinja template)
FAMILIES = (
    ("chatml", ("<|im_start|>", "<|im_end|>"), _CHATML),
    ("llama3", ("<|start_header_id|>", "<|eot_id|>"), _LLAMA3),
    ("mistral", ("[INST]", "[/INST]"), _MISTRAL),
    ("gemma", ("<start_of_turn>", "<end_of_turn>"), _GEMMA),
    ("phi3", ("<|user|>", "<|end|>"), _PHI3),
)


def family_of(go_template: str) -> str | None:
    for family, markers, _ in FAMILIES:
        if all(marker in go_template for marker in markers):
            return family
    return None


def translate(go_template: str, model_name: str) -> str:
    """The Jinja template of the Go template's family; ValueError naming the model otherwise."""
    family = family_of(go_template)
    if family is None:
        known = ", ".join(f for f, _, _ in FAMILIES)
        raise ValueError(
            f"model {model_name}: its GGUF has no chat template and its Ollama template is not "
            f"one of the prompt formats pagefleet translates ({known}); use /api/generate with "
            "raw: true or /v1/completions with your own prompt")
    return next(t for f, _, t in FAMILIES if f == family)
