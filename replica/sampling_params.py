"""Per-request sampling settings, validated with errors that name the field."""
from dataclasses import dataclass, field

from replica.request_checks import RequestError

MAX_LOGPROBS = 20

STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputSpec:
    """A constraint on the output, as plain data (picklable; compiled on the engine side).

    kind: "json_schema" (value: the schema as a JSON string), "json_object" (any JSON object;
    value ""), "regex" (value: the pattern), "choice" (value: a tuple of the allowed strings),
    "grammar" (value: EBNF text) or "structural_tag" (value: xgrammar's structural-tag JSON,
    which tool calls use). Frozen and hashable: the engine caches a compiled grammar per spec.
    """
    kind: str
    value: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise RequestError("structured_output", f"kind must be one of {', '.join(STRUCTURED_KINDS)}")
        if self.kind == "choice":
            if isinstance(self.value, list):
                object.__setattr__(self, "value", tuple(self.value))
            if not self.value or not all(isinstance(c, str) and c for c in self.value):
                raise RequestError("structured_output", "choice needs non-empty strings")
        elif not isinstance(self.value, str):
            raise RequestError("structured_output", f"{self.kind} needs a string")


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16        # None: up to the context length
    min_tokens: int = 0
    temperature: float = 1.0           # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0    # transformers' multiplicative penalty on prompt + output tokens
    presence_penalty: float = 0.0      # OpenAI's additive penalties on output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None        # number of top alternatives per token (0: only the chosen)
    skip_special_tokens: bool = True
    structured_output: StructuredOutputSpec | None = None    # None: unconstrained (costs nothing)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n", "must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.temperature >= 0.0, "temperature", "must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 or -1 turns it off)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"must be in [0, {MAX_LOGPROBS}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise RequestError(name, rule)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError("min_tokens", "must be <= max_tokens")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
