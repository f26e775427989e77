"""Constrained decoding: grammars compiled by xgrammar, one matcher per sequence, and the
allowed-token bitmask of a whole batch.

Per step (engine side, where sampling happens):
    mask = structured.allowed_mask(seqs)        # None when no row is under a live grammar
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
- The grammar's vocabulary is the tokenizer's (`grammar_vocab_size`); ids from there to the
  logits' width (an embedding padded past the tokenizer) are never allowed in a constrained
  row, and are masked by one slice on the device. Handing the padding to xgrammar instead
  makes every fill clear, and every accept search, one "special token" per padded id: with
  SmolLM2's 49k tokens under a 128k-wide model that was 20x the cost of the grammar itself.
- The host work per step is two calls into xgrammar's C++ for the whole batch, without the
  GIL: one accept of the last tokens, one fill of the bitmask across `max_threads` threads.
  Rows whose grammar has terminated (ignore_eos runs on) are neither filled nor masked.
- The core calls `allowed_mask` after launching the step's forward pass, so the fill runs on
  the host while the device computes; the bitmask goes to the device by an asynchronous copy
  from one of two pinned buffers, and a buffer is refilled only after its last copy is done.
"""
import functools
import json
import logging
import os
import weakref
from dataclasses import dataclass

import torch

from replica.engine.sequence import Sequence
from replica.sampling_params import StructuredOutputSpec

log = logging.getLogger(__name__)

_COMPILE_CACHE_SIZE = 256
_NUM_HOST_BUFFERS = 2       # a step's bitmask is in a copy while the next one is filled
_MAX_FILL_THREADS = 8       # 128 rows of a string state fill in ~0.1 ms on 8 threads


def default_fill_threads() -> int:
    """Half the cores this process may use (the other half runs the step loop and the front
    end), at least one, at most `_MAX_FILL_THREADS`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(_MAX_FILL_THREADS, cpus // 2))


@dataclass
class AllowedMask:
    """What a step's grammars allow, on the logits' device."""
    bitmask: torch.Tensor          # [R', ceil(grammar_vocab_size / 32)] int32; row i is logits row i
    rows: torch.Tensor             # [R] int64: the rows under a grammar (the others are free)
    grammar_vocab_size: int        # ids >= this are never allowed in those rows

    def apply(self, logits: torch.Tensor) -> None:
        """Sets the logits of forbidden tokens to -inf, in place, in the constrained rows."""
        import xgrammar as xgr

        # logits: [S, V]; the bitmask covers [:grammar_vocab_size], the slice the rest. The
        # runner's logits are an inference tensor: only inference mode may write into them.
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.grammar_vocab_size,
                                        indices=self.rows)
        if self.grammar_vocab_size < logits.shape[1]:
            with torch.inference_mode():
                logits[:, self.grammar_vocab_size:].index_fill_(0, self.rows, float("-inf"))


class _HostBuffers:
    """`_NUM_HOST_BUFFERS` host bitmasks (pinned on CUDA), used in turn; each remembers an event
    recorded after its copy to the device was queued, and waits for it before it is refilled."""

    def __init__(self, words: int, device: torch.device):
        self.words, self.device = words, device
        self._masks: list[torch.Tensor] = [torch.empty(0, words, dtype=torch.int32)] * _NUM_HOST_BUFFERS
        self._rows: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * _NUM_HOST_BUFFERS
        self._copied: list[torch.cuda.Event | None] = [None] * _NUM_HOST_BUFFERS
        self._turn = 0

    def take(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(bitmask [num_rows, words], row indices [num_rows], slot) of the next free slot."""
        slot = self._turn = (self._turn + 1) % _NUM_HOST_BUFFERS
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()     # in practice long done: the last step was read
        if self._masks[slot].shape[0] < num_rows:
            size = max(num_rows, 2 * self._masks[slot].shape[0])
            pin = self.device.type == "cuda"
            self._masks[slot] = torch.empty(size, self.words, dtype=torch.int32, pin_memory=pin)
            self._rows[slot] = torch.empty(size, dtype=torch.int64, pin_memory=pin)
        return self._masks[slot][:num_rows], self._rows[slot][:num_rows], slot

    def to_device(self, bitmask: torch.Tensor, rows: torch.Tensor, slot: int):
        if self.device.type != "cuda":
            return bitmask, rows
        on_device = (bitmask.to(self.device, non_blocking=True), rows.to(self.device, non_blocking=True))
        self._copied[slot] = torch.cuda.Event()
        self._copied[slot].record()
        return on_device


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], device: torch.device,
                 max_threads: int | None = None):
        self._tokenizer = tokenizer            # replica Tokenizer (its `.hf` feeds xgrammar)
        self.vocab_size = vocab_size           # the logits' width (may exceed the tokenizer's)
        self.grammar_vocab_size = min(tokenizer.vocab_size, vocab_size)
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self.max_threads = max_threads or default_fill_threads()
        self.num_masked_tokens = 0             # tokens sampled under a live grammar, ever
        self._compiler = None
        self._batch = None                     # xgrammar's BatchGrammarMatcher (its threads)
        self._matchers: weakref.WeakKeyDictionary[Sequence, object] = weakref.WeakKeyDictionary()
        self._buffers = _HostBuffers(-(-self.grammar_vocab_size // 32), device)

    # ---- compilation --------------------------------------------------------------------
    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            stop_ids = [i for i in self.eos_token_ids if i < self.grammar_vocab_size]
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer.hf, vocab_size=self.grammar_vocab_size,
                                                      stop_token_ids=stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            self._batch = xgr.BatchGrammarMatcher(self.max_threads)
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

    def allowed_mask(self, seqs: list[Sequence]) -> AllowedMask | None:
        """The mask of `seqs`' rows under a live grammar, or None when there is none."""
        rows, matchers = [], []
        for i, seq in enumerate(seqs):
            # a sequence that ended at the step read just now still has a row: its token is dropped
            if seq.params.structured_output is not None and not seq.status.is_finished:
                matcher = self._matcher(seq)
                if not matcher.is_terminated():   # ended (ignore_eos runs on): no constraint left
                    rows.append(i)
                    matchers.append(matcher)
        if not rows:
            return None
        # rows are ascending: the bitmask needs rows up to the last constrained one only
        bitmask, row_ids, slot = self._buffers.take(rows[-1] + 1)
        row_ids = row_ids[:len(rows)]
        row_ids.numpy()[:] = rows
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        self.num_masked_tokens += len(rows)
        return AllowedMask(*self._buffers.to_device(bitmask, row_ids, slot), self.grammar_vocab_size)

    def accept(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Advances the live matchers of `seqs` by their new tokens (one batched call)."""
        import xgrammar as xgr

        live, matchers, tokens = [], [], []
        for seq, token_id in zip(seqs, token_ids):
            if seq.params.structured_output is None:
                continue
            matcher = self._matchers.get(seq)
            if matcher is not None and not matcher.is_terminated():
                live.append(seq)
                matchers.append(matcher)
                tokens.append(token_id)
        if not matchers:
            return
        accepted = xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
        for seq, token_id, ok in zip(live, tokens, accepted):
            if not ok:
                log.warning("token %d broke the grammar of %r", token_id, seq)


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
