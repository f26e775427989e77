"""Settings of the HTTP side of a replica, validated once at start-up.

The engine's own settings live in `replica.config.EngineConfig`; these are only what the
server decides: who may call it, how big a request may be, and how long a drain may last.
"""
import importlib.metadata
from dataclasses import dataclass, field

MAX_INT = 2**31 - 1       # the largest count a request field may hold (int32, as clients expect)
MAX_LOGPROBS = 20          # top alternatives per token (OpenAI's chat limit; vLLM's default)
MAX_PROMPTS_PER_REQUEST = 32   # /v1/completions with a list of prompts


def _package_version() -> str:
    try:
        return importlib.metadata.version("pagefleet")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None     # None: the engine's derived name
    api_keys: tuple[str, ...] = ()           # empty: no authentication
    drain_timeout_s: float = 30.0            # SIGTERM waits this long for requests in flight
    max_body_bytes: int = 4 * 1024 * 1024    # larger bodies get 413
    max_n: int = 16                          # samples per request (n)
    retry_after_s: int = 1                   # Retry-After of a 503 for a full queue
    log_level: str = "info"
    tool_call_parser: str | None = None      # None: picked from the chat template
    version: str = field(default_factory=_package_version)

    def __post_init__(self) -> None:
        self.api_keys = tuple(k for k in self.api_keys if k)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds, got {self.drain_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.tool_call_parser not in (None, "hermes", "llama3_json", "mistral"):
            raise ValueError("tool_call_parser must be hermes, llama3_json or mistral, "
                             f"got {self.tool_call_parser!r}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be empty")
