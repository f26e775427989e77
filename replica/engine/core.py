"""EngineCore: the token-level step loop. Everything here runs on one thread of one process.

step(): scheduler.schedule() → model_runner.execute() → sampler.sample() → append tokens, token
stop checks (EOS, stop token ids, length) → one `SeqOutput` per sample that got news.

The core knows no text: detokenisation and stop strings belong to the front end
(`output_processor.py`), which ends a sample that matched a stop string with `stop_seq`. In
`replica serve` the core runs in a child process (`core_proc.py`); offline, `LLMEngine` wraps it in
the same process.
"""
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from replica.config import EngineConfig
from replica.engine.block_manager import BlockManager
from replica.engine.messages import SeqOutput
from replica.engine.model_runner import ModelRunner
from replica.engine.sampler import SampledBatch, Sampler
from replica.engine.scheduler import Scheduler, StepPlan
from replica.engine.sequence import PLACEHOLDER_TOKEN, Sequence, SequenceStatus
from replica.engine.structured_output import StructuredOutputs
from replica.kernels import ops
from replica.layers.attention import get_attention_backend
from replica.models.llama import LlamaForCausalLM
from replica.models.loader import open_checkpoint
from replica.models.registry import default_served_name
from replica.models.tokenizer import Tokenizer
from replica.outputs import EngineStats
from replica.quantization.methods import resolve_quantization
from replica.request_checks import RequestError, check_context, check_num_samples, check_prompt_token_ids
from replica.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 1 << 30
_MAX_DEFAULT_MODEL_LEN = 8192

_STATUS_OF_REASON = {"stop": SequenceStatus.FINISHED_STOPPED, "abort": SequenceStatus.FINISHED_ABORTED}


@dataclass
class _InFlight:
    plan: StepPlan
    seqs: list[Sequence]            # the sampled rows, in order
    sampled: SampledBatch
    rows: np.ndarray                # the batch row of each sampled sequence


@dataclass
class _CoreRequest:
    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    first_scheduled_s: float | None = None


def validate_request(prompt_token_ids: list[int], params: SamplingParams, *, vocab_size: int,
                     max_model_len: int, max_num_seqs: int, has_tokenizer: bool) -> None:
    """Raises RequestError (a ValueError naming the field and the limit) for a request that can
    never run. The front end calls it before sending, the core again on arrival."""
    check_num_samples(params.n, max_num_seqs, "max_num_seqs, the most sequences one step can hold")
    check_context(len(prompt_token_ids), params.max_tokens, max_model_len)
    check_prompt_token_ids(prompt_token_ids, vocab_size)
    if params.structured_output is not None and not has_tokenizer:
        raise RequestError("response_format", "this model has no tokenizer to constrain output")


def resolve_max_model_len(config: EngineConfig, model_config) -> int:
    limit = model_config.max_position_embeddings
    if model_config.sliding_window:
        limit = min(limit, model_config.sliding_window)  # no sliding-window attention here
    if config.max_model_len is None:
        return min(limit, _MAX_DEFAULT_MODEL_LEN)
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit "
                         f"of {limit} positions")
    return config.max_model_len


def load_tokenizer(checkpoint) -> Tokenizer | None:
    if checkpoint.path is None:
        return None
    fmt = "hf" if checkpoint.format == "dummy" else checkpoint.format
    return Tokenizer.load(checkpoint.path, fmt, checkpoint.config.eos_token_ids)


class EngineCore:
    def __init__(self, config: EngineConfig, checkpoint=None):
        """checkpoint: an already opened checkpoint (e.g. in-memory weights for benchmarks);
        by default `config.model` is opened from disk."""
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.kv_dtype = config.resolve_kv_cache_dtype(self.device, self.dtype)
        started = time.monotonic()
        checkpoint = checkpoint or open_checkpoint(config.model, config.load_format)
        self.model_config = cfg = checkpoint.config
        self.model_path = checkpoint.path
        self.model_name = default_served_name(config.model)
        # The tokenizer (transformers' import and its build: ~3 s on 2 CPU cores) loads on a thread
        # while the weights load and the KV cache is sized; the sampler is the first to need it.
        tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        tokenizer_future = tokenizer_pool.submit(load_tokenizer, checkpoint)
        tokenizer_pool.shutdown(wait=False)
        self.max_model_len = resolve_max_model_len(config, cfg)
        kernel_backend = config.resolve_kernel_backend(self.device)
        ops.select_kernel_backend(kernel_backend)
        backend = get_attention_backend(kernel_backend)
        quantization = resolve_quantization(config.quantization, checkpoint, self.device)
        self.model = LlamaForCausalLM(cfg, self.dtype, self.device, backend, self.max_model_len,
                                      quantization=quantization)
        self.model.load_weights(checkpoint.weights(self.device, keep_quantized=quantization == "gguf"))
        self.memory_profile = None          # set by the GPU's KV sizing (gpu_memory.MemoryProfile)
        num_blocks = self._resolve_num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model, num_blocks, config.block_size, config.max_num_seqs, self.max_model_len,
            kv_dtype=self.kv_dtype,
            use_cuda_graphs=(self.device.type == "cuda" and backend.name == "triton"
                             and not config.enforce_eager),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_piecewise_tokens=config.cuda_graph_max_tokens)
        self.tokenizer = tokenizer_future.result()
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else cfg.eos_token_ids
        self.sampler = Sampler(cfg.vocab_size, self.eos_token_ids, config.seed, self.device,
                               max_num_rows=config.max_num_seqs)
        self.structured = (StructuredOutputs(self.tokenizer, cfg.vocab_size, self.eos_token_ids, self.device)
                           if self.tokenizer is not None else None)     # structured outputs
        self.requests: dict[str, _CoreRequest] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._pending: list[SeqOutput] = []     # outputs of aborts and stops, sent with the next step
        self._in_flight: _InFlight | None = None   # the launched step whose tokens are not read yet
        self.is_overlapped = config.enable_overlap
        self.num_overlapped_steps = 0        # steps launched before the previous one was read
        self.load_s = time.monotonic() - started
        kv_bytes = num_blocks * ModelRunner.kv_bytes_per_block(cfg, config.block_size, self.kv_dtype)
        log.info("loaded %s (%s, %s layers) on %s in %.1fs; KV cache %.1f MiB (%s): %d blocks of %d "
                 "tokens = %d tokens, %.1f concurrent sequences of max_model_len %d",
                 config.model, cfg.architecture, cfg.num_layers, self.device, self.load_s,
                 kv_bytes / 2**20, str(self.kv_dtype).removeprefix("torch."), num_blocks,
                 config.block_size, num_blocks * config.block_size,
                 num_blocks * config.block_size / self.max_model_len, self.max_model_len)

    def _resolve_num_blocks(self) -> int:
        cfg, block_size = self.config, self.config.block_size
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, block_size, self.kv_dtype)
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
        validate_request(prompt_token_ids, params, vocab_size=self.model_config.vocab_size,
                         max_model_len=self.max_model_len, max_num_seqs=self.config.max_num_seqs,
                         has_tokenizer=self.tokenizer is not None)

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
        self.requests[request_id] = _CoreRequest(request_id, params, [seq])
        self.num_prompt_tokens += len(prompt_token_ids)
        self.scheduler.add(seq)

    def _seed(self, seq: Sequence) -> None:
        if seq.params.seed is not None and not seq.params.is_greedy:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed((seq.params.seed * 1_000_003 + seq.index) % (1 << 63))

    def stop_seq(self, request_id: str, index: int | None, reason: str) -> None:
        """Ends one sample (or all of a request's, index None), freeing its blocks now. Idempotent.
        The front end already knows; the ended samples are reported once more (no new tokens)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        if index is None:
            request.seqs[0].num_pending_forks = 0      # samples not yet forked never will be
        status = _STATUS_OF_REASON[reason]
        for seq in request.seqs:
            if index is None or seq.index == index:
                self._finish(seq, status)
        self._pending += self._collect(request, request.seqs)

    def abort_request(self, request_id: str) -> None:
        self.stop_seq(request_id, None, "abort")

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending) or self._in_flight is not None

    # ---- the step ------------------------------------------------------------------------------
    # Overlap scheduling: step() plans and launches step t+1 before it reads step t's sampled
    # tokens, so the host's work for t+1 runs while the device still computes t:
    #
    #   host:   schedule t+1 │ launch t+1 (inputs, forward, sample) │ read t's tokens, stop checks
    #   device: ─── t ──────────────────┤├──────────── t+1 ────────────────────────
    #
    # A sequence sampled at t has a PLACEHOLDER_TOKEN until then; its input at t+1 comes from t's
    # sampled tensor on the device. A sequence that t ended (EOS, length) also computed a token
    # at t+1, which is dropped, never reported. Rows that need the newest token ids on the host
    # to sample (penalties, a grammar's matcher) make a step read t's tokens before sampling t+1.
    def step(self) -> list[SeqOutput]:
        outputs, self._pending = self._pending, []
        prev, self._in_flight = self._in_flight, None
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            now = time.monotonic()
            for entry in plan.scheduled:
                request = self.requests[entry.seq.request_id]
                if request.first_scheduled_s is None:
                    request.first_scheduled_s = now
            logits = self.runner.execute(plan, prev.sampled.tokens if prev else None,
                                         prev.rows if prev else None)
            self.scheduler.finish_step(plan, cache_blocks=False)
            for parent, child in plan.forks:
                self.requests[parent.request_id].seqs.append(child)
                self._seed(child)
            seqs = [seq for seq, _ in plan.samplers]
            # batch rows now: reading the previous step's tokens below may end a sequence, which
            # gives its row back (its token of this step is then dropped)
            rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
            if prev is not None and any(s.params.has_penalties or s.params.structured_output is not None
                                        for s in seqs):
                # this step's forward pass is already queued behind t's: the host reads t's
                # tokens, advances the matchers and fills the bitmask while the device runs it
                outputs += self._resolve(prev)
                prev = None
                self.num_overlapped_steps += 1
            allowed = self.structured.allowed_mask(seqs) if self.structured is not None else None
            sampled = self.sampler.sample_async(logits, seqs, allowed_mask=allowed, rows=rows,
                                                new_rows=plan.new_rows)
            for seq in seqs:
                seq.token_ids.append(PLACEHOLDER_TOKEN)
                seq.num_placeholders += 1
            self._in_flight = _InFlight(plan, seqs, sampled, rows)
            if not self.is_overlapped:
                outputs += self._resolve(self._in_flight)
                self._in_flight = None
        if prev is not None:
            outputs += self._resolve(prev)
            self.num_overlapped_steps += self._in_flight is not None
        return outputs

    def _resolve(self, step: "_InFlight") -> list[SeqOutput]:
        """Reads a launched step's sampled tokens into its sequences, registers their full blocks
        for prefix caching, checks EOS, stop token ids and length, and reports the news."""
        token_ids, logprobs = step.sampled.to_host()
        live = []
        for seq, token_id, logprob in zip(step.seqs, token_ids, logprobs):
            if seq.status.is_finished:
                continue                  # ended meanwhile: this token is never reported
            position = len(seq.token_ids) - seq.num_placeholders
            seq.token_ids[position] = token_id
            seq.num_placeholders -= 1
            if logprob is not None:
                seq.new_logprobs.append(logprob)
            live.append((seq, token_id, position))
        self.scheduler.cache_blocks(step.plan)
        if self.structured is not None:               # structured outputs: advance the matchers
            self.structured.accept([seq for seq, _, _ in live], [token for _, token, _ in live])
        touched: dict[str, list[Sequence]] = {}
        for seq, token_id, position in live:
            self._check_stop(seq, token_id, position)
            touched.setdefault(seq.request_id, []).append(seq)
        self.num_generation_tokens += len(live)
        outputs: list[SeqOutput] = []
        for request_id, changed in touched.items():
            outputs += self._collect(self.requests[request_id], changed)
        return outputs

    def _check_stop(self, seq: Sequence, token_id: int, position: int) -> None:
        params = seq.params
        num_output_tokens = position + 1 - seq.num_prompt_tokens
        status = None
        if token_id in params.stop_token_ids:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token_id
        elif token_id in self.eos_token_ids and not params.ignore_eos:
            status = SequenceStatus.FINISHED_STOPPED
        elif (num_output_tokens >= (params.max_tokens or self.max_model_len)
              or position + 1 >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            self._finish(seq, status)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Ends a sequence; tokens sampled for it but not yet read are dropped."""
        if seq.num_placeholders:
            del seq.token_ids[-seq.num_placeholders:]
            seq.num_placeholders = 0
        self.scheduler.finish(seq, status)

    def _collect(self, request: _CoreRequest, changed: list[Sequence]) -> list[SeqOutput]:
        """The news of `changed` samples since they were last reported; forgets the request
        once every sample has finished and been reported."""
        outputs: list[SeqOutput] = []
        for seq in changed:
            if seq.is_reported_finished:
                continue
            num_known = seq.num_output_tokens - seq.num_placeholders
            first = seq.num_prompt_tokens       # one slice of the news, not a copy of all the output
            new_ids = seq.token_ids[first + seq.num_reported_tokens:first + num_known]
            seq.num_reported_tokens = num_known
            logprobs, seq.new_logprobs = (seq.new_logprobs if seq.params.logprobs is not None else None), []
            seq.is_reported_finished = seq.status.is_finished
            stop_token = seq.stop_reason if isinstance(seq.stop_reason, int) else None
            outputs.append(SeqOutput(request.request_id, seq.index, new_ids, logprobs,
                                     seq.status.finish_reason, stop_token, seq.num_cached_tokens,
                                     request.first_scheduled_s))
        if (all(s.is_reported_finished for s in request.seqs)
                and request.seqs[0].num_pending_forks == 0):
            del self.requests[request.request_id]
            if outputs:
                outputs[-1].is_request_done = True
            else:
                outputs.append(SeqOutput(request.request_id, 0, [], None, "abort", None, 0, None, True))
        return outputs

    # ---- embeddings (the computation lives in embedding.py) ------------------------------------
    @property
    def embedding_pooling(self) -> str:
        """The pooling the checkpoint names (GGUF `pooling_type`), else mean."""
        return self.model_config.pooling or "mean"

    def embed(self, token_lists: list[list[int]], pooling: str | None = None) -> list[list[float]]:
        """Unit vectors of the inputs' final hidden states; never touches the KV pool. Runs
        between steps; ValueError names a bad input."""
        from replica.engine import embedding

        vocab = self.model_config.vocab_size
        for ids in token_lists:
            if not ids:
                raise ValueError("input must contain at least one token")
            if len(ids) > self.max_model_len:
                raise ValueError(f"input has {len(ids)} tokens; this model's context is "
                                 f"{self.max_model_len} tokens")
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"input token ids must be in [0, {vocab})")
        return embedding.embed(self.model, token_lists, pooling or self.embedding_pooling,
                               self.config.max_num_batched_tokens, self.config.block_size)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage, num_blocks_total=bm.num_blocks, num_blocks_free=bm.num_free_blocks,
            prefix_cache_queries=bm.num_prefix_queries, prefix_cache_hits=bm.num_prefix_hits,
            num_preemptions=self.scheduler.num_preemptions, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens)
