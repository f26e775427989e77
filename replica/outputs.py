"""What the engine hands back: per-step deltas for each request."""
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # best first


@dataclass
class CompletionOutput:
    index: int                          # sample index within the request (n > 1)
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] | None
    finish_reason: str | None           # "stop" | "length" | "abort" | None
    stop_reason: str | int | None       # the stop string or stop token id that matched
    num_output_tokens: int


@dataclass
class RequestMetrics:
    arrival_s: float                    # time.monotonic()
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]     # the samples with news this step
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    metrics: RequestMetrics


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks_total: int
    num_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class Completion:
    """One sample's deltas folded together: what a non-streaming answer reports.

    The one accumulator of `CompletionOutput` deltas (the offline `LLM`, both server APIs).
    `logprobs` stays None unless the deltas carry logprobs.
    """
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.new_text
        self.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(delta.new_logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
