"""LLMEngine: the synchronous step loop.

step(): scheduler.schedule() → model_runner.execute() → sampler.sample() → append tokens, stop
checks, detokenisation → RequestOutput deltas. Everything here runs on one thread.
"""
import logging
import time
from dataclasses import dataclass, field

import torch

from replica.config import EngineConfig
from replica.engine.block_manager import BlockManager
from replica.engine.model_runner import ModelRunner
from replica.engine.sampler import Sampler
from replica.engine.scheduler import Scheduler, StepPlan
from replica.engine.sequence import Sequence, SequenceStatus
from replica.engine.structured_output import StructuredOutputs
from replica.layers.attention import get_attention_backend
from replica.models.llama import LlamaForCausalLM
from replica.models.loader import open_checkpoint
from replica.models.registry import default_served_name
from replica.models.tokenizer import IncrementalDetokenizer, Tokenizer
from replica.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from replica.request_checks import RequestError, check_context, check_num_samples, check_prompt_token_ids
from replica.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 1 << 30
_MAX_DEFAULT_MODEL_LEN = 8192


@dataclass
class _SampleState:
    """Output bookkeeping of one sequence (text and what was already handed out)."""
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    is_reported_finished: bool = False


@dataclass
class _Request:
    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    seqs: list[Sequence]
    states: dict[int, _SampleState]
    metrics: RequestMetrics


class LLMEngine:
    def __init__(self, config: EngineConfig, checkpoint=None):
        """checkpoint: an already opened checkpoint (e.g. in-memory weights for benchmarks);
        by default `config.model` is opened from disk."""
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        started = time.monotonic()
        checkpoint = checkpoint or open_checkpoint(config.model, config.load_format)
        self.model_config = cfg = checkpoint.config
        self.model_path = checkpoint.path
        self.model_name = default_served_name(config.model)
        self.tokenizer = (Tokenizer.load(checkpoint.path, "hf" if checkpoint.format == "dummy" else checkpoint.format,
                                         cfg.eos_token_ids)
                          if checkpoint.path is not None else None)
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else cfg.eos_token_ids
        self.max_model_len = self._resolve_max_model_len()
        backend = get_attention_backend(config.resolve_attention_backend(self.device))
        self.model = LlamaForCausalLM(cfg, self.dtype, self.device, backend, self.max_model_len)
        self.model.load_weights(checkpoint.weights(self.device))
        num_blocks = self._resolve_num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model, num_blocks, config.block_size, config.max_num_seqs, self.max_model_len,
            use_cuda_graphs=(self.device.type == "cuda" and backend.name == "triton"
                             and not config.enforce_eager))
        self.sampler = Sampler(cfg.vocab_size, self.eos_token_ids, config.seed, self.device)
        self.structured = (StructuredOutputs(self.tokenizer, cfg.vocab_size, self.eos_token_ids, self.device)
                           if self.tokenizer is not None else None)     # structured outputs
        self.requests: dict[str, _Request] = {}
        self.pending_outputs: list[RequestOutput] = []
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.load_s = time.monotonic() - started
        kv_bytes = num_blocks * ModelRunner.kv_bytes_per_block(cfg, config.block_size, self.dtype)
        log.info("loaded %s (%s, %s layers) on %s in %.1fs; KV cache %.1f MiB: %d blocks of %d tokens "
                 "= %d tokens, %.1f concurrent sequences of max_model_len %d",
                 config.model, cfg.architecture, cfg.num_layers, self.device, self.load_s,
                 kv_bytes / 2**20, num_blocks, config.block_size, num_blocks * config.block_size,
                 num_blocks * config.block_size / self.max_model_len, self.max_model_len)

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.model_config.sliding_window:
            limit = min(limit, self.model_config.sliding_window)  # no sliding-window attention here
        if self.config.max_model_len is None:
            return min(limit, _MAX_DEFAULT_MODEL_LEN)
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's limit "
                             f"of {limit} positions")
        return self.config.max_model_len

    def _resolve_num_blocks(self) -> int:
        cfg, block_size = self.config, self.config.block_size
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, block_size, self.dtype)
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif cfg.kv_cache_memory_bytes is not None:
            num_blocks = cfg.kv_cache_memory_bytes // per_block
        elif self.device.type == "cuda":
            from replica.engine.gpu_memory import kv_cache_bytes_from_profile
            num_blocks = kv_cache_bytes_from_profile(self) // per_block
        else:
            num_blocks = _CPU_KV_CACHE_BYTES // per_block
        needed = -(-self.max_model_len // block_size)
        if num_blocks < needed:
            raise ValueError(
                f"KV cache too small: {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} "
                f"tokens, but one sequence of max_model_len {self.max_model_len} needs {needed} blocks "
                f"({needed * per_block / 2**20:.1f} MiB); lower --max-model-len or give the cache more memory")
        return int(num_blocks)

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError (naming the limit) for a request that can never run."""
        check_num_samples(params.n, self.config.max_num_seqs,
                          "max_num_seqs, the most sequences one step can hold")
        check_context(len(prompt_token_ids), params.max_tokens, self.max_model_len)
        check_prompt_token_ids(prompt_token_ids, self.model_config.vocab_size)
        if params.structured_output is not None and self.structured is None:
            raise RequestError("response_format", "this model has no tokenizer to constrain output")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_s: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        if params.structured_output is not None:    # structured outputs: compile (cached) now
            self.structured.compile(params.structured_output)
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        seq = Sequence(request_id, prompt_token_ids, params, arrival_s)
        self._seed(seq)
        request = _Request(request_id, params, len(prompt_token_ids), [seq], {},
                           RequestMetrics(arrival_s=arrival_s))
        request.states[seq.seq_id] = self._new_state(seq)
        self.requests[request_id] = request
        self.num_prompt_tokens += len(prompt_token_ids)
        self.scheduler.add(seq)

    def _seed(self, seq: Sequence) -> None:
        if seq.params.seed is not None and not seq.params.is_greedy:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed((seq.params.seed * 1_000_003 + seq.index) % (1 << 63))

    def _new_state(self, seq: Sequence) -> _SampleState:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids[:seq.num_prompt_tokens],
                                           seq.params.skip_special_tokens)
        return _SampleState(detok)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        output = self._collect(request, request.seqs)
        if output is not None:
            self.pending_outputs.append(output)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.pending_outputs)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self.pending_outputs = self.pending_outputs, []
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        now = time.monotonic()
        for entry in plan.scheduled:
            request = self.requests[entry.seq.request_id]
            if request.metrics.first_scheduled_s is None:
                request.metrics.first_scheduled_s = now
        logits = self.runner.execute(plan)
        self.scheduler.finish_step(plan)
        for parent, child in plan.forks:
            request = self.requests[parent.request_id]
            request.seqs.append(child)
            self._seed(child)
            request.states[child.seq_id] = self._new_state(child)
        seqs = [seq for seq, _ in plan.samplers]
        # structured outputs: the bitmask is filled while the forward pass runs on the GPU
        allowed = self.structured.allowed_mask(seqs) if self.structured is not None else None
        token_ids, logprobs = self.sampler.sample(logits, seqs, allowed_mask=allowed)
        if allowed is not None:
            self.structured.accept(seqs, token_ids)
        now = time.monotonic()
        touched: dict[str, list[Sequence]] = {}
        for seq, token_id, logprob in zip(seqs, token_ids, logprobs):
            self._append_token(seq, token_id, logprob)
            touched.setdefault(seq.request_id, []).append(seq)
        self.num_generation_tokens += len(seqs)
        for request_id, changed in touched.items():
            request = self.requests[request_id]
            if request.metrics.first_token_s is None:
                request.metrics.first_token_s = now
            request.metrics.last_token_s = now
            output = self._collect(request, changed)
            if output is not None:
                outputs.append(output)
        return outputs

    def _append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> None:
        request = self.requests[seq.request_id]
        state = request.states[seq.seq_id]
        params = seq.params
        seq.token_ids.append(token_id)
        if logprob is not None:
            state.logprobs.append(logprob)
        status = None
        if token_id in params.stop_token_ids:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token_id
        elif token_id in self.eos_token_ids and not params.ignore_eos:
            status = SequenceStatus.FINISHED_STOPPED
        elif state.detokenizer is not None:
            before = len(state.text)
            state.text += state.detokenizer.step([token_id])
            if params.stop and len(state.text) > before:
                status = self._check_stop_strings(seq, state, before)
        if status is None and (seq.num_output_tokens >= (params.max_tokens or self.max_model_len)
                               or seq.num_tokens >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            if not isinstance(seq.stop_reason, str) and state.detokenizer is not None:
                state.text += state.detokenizer.flush()
            self.scheduler.finish(seq, status)

    def _check_stop_strings(self, seq: Sequence, state: _SampleState, before: int) -> SequenceStatus | None:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, before - longest + 1)
        found = [(state.text.find(s, start), s) for s in seq.params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return None
        index, stop = min(found)
        state.text = state.text[:index]          # the stop string is not part of the answer
        seq.stop_reason = stop
        return SequenceStatus.FINISHED_STOPPED

    def _collect(self, request: _Request, changed: list[Sequence]) -> RequestOutput | None:
        completions = []
        for seq in changed:
            state = request.states[seq.seq_id]
            if state.is_reported_finished:
                continue
            finished = seq.status.is_finished
            safe_end = len(state.text)
            if not finished and seq.params.stop:
                # hold back a tail that could still become a stop string
                safe_end -= max(len(s) for s in seq.params.stop) - 1
            new_text = state.text[state.num_emitted_chars:safe_end] if safe_end > state.num_emitted_chars else ""
            state.num_emitted_chars += len(new_text)
            new_ids = seq.output_token_ids[state.num_emitted_tokens:]
            new_logprobs = (state.logprobs[state.num_emitted_tokens:]
                            if seq.params.logprobs is not None else None)
            state.num_emitted_tokens = seq.num_output_tokens
            state.is_reported_finished = finished
            completions.append(CompletionOutput(
                index=seq.index, new_token_ids=new_ids, new_text=new_text, new_logprobs=new_logprobs,
                finish_reason=seq.status.finish_reason, stop_reason=seq.stop_reason,
                num_output_tokens=seq.num_output_tokens))
        done = all(s.status.is_finished for s in request.seqs) and request.seqs[0].num_pending_forks == 0
        if done:
            request.metrics.finished_s = time.monotonic()
            del self.requests[request.request_id]
        if not completions and not done:
            return None
        return RequestOutput(request.request_id, completions, done, request.num_prompt_tokens,
                             request.seqs[0].num_cached_tokens, request.metrics)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage, num_blocks_total=bm.num_blocks, num_blocks_free=bm.num_free_blocks,
            prefix_cache_queries=bm.num_prefix_queries, prefix_cache_hits=bm.num_prefix_hits,
            num_preemptions=self.scheduler.num_preemptions, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens)
