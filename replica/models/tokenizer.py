"""Tokenizer, chat template and incremental detokenisation.

The tokenizer comes from the checkpoint folder's tokenizer files or from the GGUF metadata
(transformers builds a fast tokenizer from either; a GGUF's is kept in `tokenizer_cache`); no
model object of transformers is used.
"""
import logging
from pathlib import Path

from replica.models import tokenizer_cache

log = logging.getLogger(__name__)

# Decoding restarts this many tokens before the new ones, so that merges and leading spaces that
# depend on the previous tokens come out as they would in a full decode.
_CONTEXT_TOKENS = 5


def check_gguf_installed() -> None:
    """transformers reads a GGUF's tokenizer only when the `gguf` distribution is installed: a
    gguf-py folder on PYTHONPATH imports but has no version, and transformers then fails with
    "Invalid version: 'N/A'". Say what to do instead."""
    import importlib.metadata

    try:
        importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("reading a GGUF's tokenizer needs the `gguf` package installed by pip "
                         "(a gguf-py folder on PYTHONPATH is not enough): pip install gguf") from None


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: list[int]):
        self.hf = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids = sorted(ids)
        self.vocab_size = len(hf_tokenizer)
        self.bos_token = hf_tokenizer.bos_token
        self.chat_template_problem: str | None = None   # why there is no chat template, if known

    @classmethod
    def load(cls, path: Path, fmt: str, eos_token_ids: list[int]) -> "Tokenizer | None":
        from transformers import AutoTokenizer

        if fmt == "gguf":
            hf = tokenizer_cache.load(path)
            if hf is None:
                check_gguf_installed()
                hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                tokenizer_cache.save(path, hf)
            tokenizer = cls(hf, eos_token_ids)
            if not tokenizer.has_chat_template:
                tokenizer._use_ollama_template(path)
            return tokenizer
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            log.warning("%s has no tokenizer files: only token-id prompts will work", path.name)
            return None
        return cls(AutoTokenizer.from_pretrained(str(path)), eos_token_ids)

    def _use_ollama_template(self, blob: Path) -> None:
        """A GGUF without `tokenizer.chat_template` that sits in Ollama's store: its template
        layer's family, translated to Jinja (or the reason it cannot be)."""
        from replica.models import ollama_store, ollama_template

        model = ollama_store.find_model_of_blob(blob)
        if model is None or not model.template:
            return
        try:
            self.hf.chat_template = ollama_template.translate(model.template, model.name.display)
        except ValueError as err:
            self.chat_template_problem = str(err)
            log.warning("%s", err)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(token_ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> list[int]:
        if not self.has_chat_template:
            raise ValueError(self.chat_template_problem or
                             "this model has no chat template: use the completions API with a raw prompt")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs)
        # The template already wrote BOS where the model wants it.
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation equals a full decode.

    A token can end in the middle of a multi-byte UTF-8 character; its text then ends in U+FFFD and
    is held back until the character's last byte arrives (or the sequence ends: `flush`).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, new_token_ids: list[int]) -> str:
        self.ids.extend(new_token_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # keep the window short: drop ids no later decode will look at
        if self.prefix_offset > 4 * _CONTEXT_TOKENS:
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset, self.read_offset = 0, self.read_offset - drop
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
