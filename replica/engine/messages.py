"""What crosses the boundary between the engine core and its front end: one message per step.

The core works in token ids; the front end (the server process, or `LLMEngine` in one process)
turns them into text. Each direction carries one message per step or per event-loop tick with the
whole batch in it, never one per token:

  front end ── CoreInputs(adds, stops, ...) ──▶ core        (pyzmq PUSH/PULL, msgspec msgpack)
  front end ◀── CoreOutputs(outputs, stats) ──── core

`SeqOutput` is per sample (a request with n > 1 has n of them), and `finish_reason` is set on the
last output of a sample: "stop" (EOS or a stop token id; stop *strings* are the front end's, which
then sends a `SeqStop`), "length", or "abort".
"""
import msgspec

from replica.config import EngineConfig
from replica.outputs import EngineStats, TokenLogprob
from replica.sampling_params import SamplingParams


class SeqOutput(msgspec.Struct, array_like=True, gc=False):
    request_id: str
    index: int                              # sample index within the request
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_token_id: int | None               # the stop token id that ended it, if one did
    num_cached_tokens: int
    first_scheduled_s: float | None         # time.monotonic(); the same clock in every process
    is_request_done: bool = False           # the core has forgotten the request (all samples ended)


class AddRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float


class SeqStop(msgspec.Struct, array_like=True):
    """End one sample (index) or the whole request (index None); `reason` is "stop" when the
    front end found a stop string, "abort" when the client went away."""
    request_id: str
    index: int | None
    reason: str


class EmbedRequest(msgspec.Struct, array_like=True):
    call_id: int
    token_lists: list[list[int]]
    pooling: str | None


class EmbedResult(msgspec.Struct, array_like=True):
    call_id: int
    vectors: list[list[float]] | None
    error: str | None                       # a ValueError's message (a bad input)


class CoreInputs(msgspec.Struct, array_like=True):
    adds: list[AddRequest] = []
    stops: list[SeqStop] = []
    embeds: list[EmbedRequest] = []
    shutdown: bool = False


class RequestError(msgspec.Struct, array_like=True):
    request_id: str
    message: str                            # a ValueError's message: names the limit


class CoreOutputs(msgspec.Struct, array_like=True):
    outputs: list[SeqOutput]
    stats: EngineStats
    errors: list[RequestError] = []
    embeddings: list[EmbedResult] = []


class CoreReady(msgspec.Struct, tag=True):
    """The core's first message: what the front end needs to know about the loaded model."""
    max_model_len: int
    num_blocks: int
    device: str
    dtype: str
    load_s: float
    stats: EngineStats
    weights_device_bytes: int               # the weights as held on the device (quantised or not)
    quantization: str | None
    kv_cache_dtype: str                     # "bfloat16", "float8_e4m3fn", ...


class CoreFailed(msgspec.Struct, tag=True):
    message: str
    is_config_error: bool                   # a ValueError (bad settings) rather than a crash


class CoreStart(msgspec.Struct):
    config: EngineConfig


HANDSHAKE = CoreReady | CoreFailed
