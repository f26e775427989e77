"""Constrained decoding: grammars compiled by xgrammar, one matcher per sequence, and the
allowed-token bitmask of a whole batch.

Per step (engine side, where sampling happens):
    mask = structured.allowed_mask(seqs)        # None when no sequence is constrained
    tokens = sampler.sample(logits, seqs, allowed_mask=mask)
    structured.accept(seqs, tokens)             # advances the matchers of constrained rows

Invariants:
- A request without a constraint costs one attribute test per row and nothing else; the
  tokenizer vocabulary (`xgrammar.TokenizerInfo`) is built on the first constrained request.
- One compiled grammar per distinct `StructuredOutputSpec` (an LRU of compiled grammars), so
  a schema sent by many requests is compiled once.
- A matcher belongs to one `Sequence` and has accepted exactly that sequence's output tokens:
  it is created on the sequence's first constrained step by replaying its output so far (so a
  forked sample, or a sequence preempted and recomputed, needs no hook), and dropped with the
  sequence (a weak reference: finished and aborted sequences need no hook either).
- The bitmask is filled on the CPU while the forward pass runs on the GPU (the runner's
  launches are asynchronous); it is copied to the logits' device and applied in the sampler.
"""
import functools
import json
import logging
import weakref

import torch

from replica.engine.sequence import Sequence
from replica.sampling_params import StructuredOutputSpec

log = logging.getLogger(__name__)

_COMPILE_CACHE_SIZE = 256


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], device: torch.device):
        self._tokenizer = tokenizer            # replica Tokenizer (its `.hf` feeds xgrammar)
        self.vocab_size = vocab_size           # the logits' width (may exceed the tokenizer's)
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self._compiler = None
        self._matchers: weakref.WeakKeyDictionary[Sequence, object] = weakref.WeakKeyDictionary()
        self._bitmask: torch.Tensor | None = None     # [rows, ceil(vocab / 32)] int32, CPU

    # ---- compilation --------------------------------------------------------------------
    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer.hf, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    @functools.lru_cache(maxsize=_COMPILE_CACHE_SIZE)
    def compile(self, spec: StructuredOutputSpec):
        """The compiled grammar of `spec`; raises ValueError for a spec xgrammar refuses."""
        compiler = self._get_compiler()
        try:
            if spec.kind == "json_schema":
                return compiler.compile_grammar(json_schema_ebnf(spec.value))
            if spec.kind == "json_object":
                return compiler.compile_grammar(json_schema_ebnf('{"type": "object"}', strict=False))
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_ebnf(spec.value))
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.value)
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(spec.value)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"structured output: {err}") from None
        raise ValueError(f"structured output: unknown kind {spec.kind!r}")

    # ---- per step -----------------------------------------------------------------------
    def _matcher(self, seq: Sequence):
        matcher = self._matchers.get(seq)
        if matcher is None:
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(self.compile(seq.params.structured_output))
            for token_id in seq.output_token_ids:    # a fork or a recomputed sequence
                matcher.accept_token(token_id)
            self._matchers[seq] = matcher
        return matcher

    def allowed_mask(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]] | None:
        """(bitmask [len(seqs), words] on the logits' device, constrained row indices), or None."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured_output is not None]
        if not rows:
            return None
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < len(seqs):
            size = max(len(seqs), 2 * (0 if self._bitmask is None else self._bitmask.shape[0]))
            self._bitmask = xgr.allocate_token_bitmask(size, self.vocab_size)
            if self.device.type == "cuda":
                self._bitmask = self._bitmask.pin_memory()
        bitmask = self._bitmask[:len(seqs)]
        for i in rows:
            matcher = self._matcher(seqs[i])
            if matcher.is_terminated():       # ended (ignore_eos runs on): no constraint left
                bitmask[i].fill_(-1)
            else:
                matcher.fill_next_token_bitmask(bitmask, i)
        return bitmask.to(self.device, non_blocking=True), rows

    def accept(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        for seq, token_id in zip(seqs, token_ids):
            if seq.params.structured_output is None:
                continue
            matcher = self._matchers.get(seq)
            if matcher is not None and not matcher.is_terminated():
                if not matcher.accept_token(token_id):
                    log.warning("token %d broke the grammar of %r", token_id, seq)


def apply_allowed_mask(logits: torch.Tensor, allowed_mask: tuple[torch.Tensor, list[int]]) -> None:
    """Sets the logits of tokens the grammar forbids to -inf, in place, for constrained rows."""
    import xgrammar as xgr

    bitmask, rows = allowed_mask
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


# xgrammar (0.2.9) writes a length-bounded string's characters as `[^"\\\r\n]`, which lets a
# raw tab or other control character into the string: invalid JSON. Its unbounded strings
# already exclude them; the bounded ones get the same class (checked by the property test).
_LOOSE_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'


def json_schema_ebnf(schema_text: str, strict: bool = True) -> str:
    """The grammar of a JSON schema as EBNF (compact separators, strings valid JSON)."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema_text, any_whitespace=False, strict_mode=strict)
    return str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose only sentences are the given strings."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
