"""OutputProcessor: the front end's half of a step, from the core's token ids to text deltas.

It owns what is text: one incremental detokenizer per sample, stop strings (with the tail that
could still become one held back), and the RequestOutput deltas the server streams. A sample
that matches a stop string ends here at once; `process` returns a `SeqStop` for the core, which
frees its blocks a step later. Tokens the core computed meanwhile are dropped, never emitted.
The same code runs in the server process (behind the engine-core process) and in `LLMEngine`.
"""
import time
from dataclasses import dataclass, field

from replica.engine.messages import SeqOutput, SeqStop
from replica.models.tokenizer import IncrementalDetokenizer, Tokenizer
from replica.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from replica.sampling_params import SamplingParams


@dataclass
class _Sample:
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    is_reported_finished: bool = False


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: dict[int, _Sample] = field(default_factory=dict)
    num_cached_tokens: int = 0
    is_core_done: bool = False      # the core ended every sample (n > 1 aborted before forking)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_s: float) -> None:
        self.requests[request_id] = _Request(request_id, list(prompt_token_ids), params,
                                             RequestMetrics(arrival_s=arrival_s))

    def forget(self, request_id: str) -> None:
        """The consumer left: nothing more is reported for this request."""
        self.requests.pop(request_id, None)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends every unfinished sample with "abort" here and now; the last output, or None
        for a request this side no longer knows."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if not request.samples:
            request.samples[0] = self._new_sample(request)
        for sample in request.samples.values():
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        request.is_core_done = True
        return self._collect(request, list(request.samples))

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def process(self, seq_outputs: list[SeqOutput], now: float | None = None
                ) -> tuple[list[RequestOutput], list[SeqStop]]:
        now = time.monotonic() if now is None else now
        stops: list[SeqStop] = []
        changed: dict[str, list[int]] = {}
        for out in seq_outputs:
            request = self.requests.get(out.request_id)
            if request is None:
                continue                     # finished or forgotten here; the core is catching up
            sample = request.samples.get(out.index)
            if sample is None:
                sample = request.samples[out.index] = self._new_sample(request)
            request.is_core_done |= out.is_request_done
            if sample.finish_reason is not None:
                if out.is_request_done:
                    changed.setdefault(out.request_id, [])
                continue                     # ended by a stop string; these tokens are dropped
            request.num_cached_tokens = out.num_cached_tokens
            request.metrics.first_scheduled_s = out.first_scheduled_s
            if out.new_token_ids:
                if request.metrics.first_token_s is None:
                    request.metrics.first_token_s = now
                request.metrics.last_token_s = now
            if self._append(request, sample, out) and out.finish_reason is None:
                stops.append(SeqStop(out.request_id, out.index, "stop"))
            changed.setdefault(out.request_id, []).append(out.index)
        results = []
        for request_id, indexes in changed.items():
            result = self._collect(self.requests[request_id], indexes)
            if result is not None:
                results.append(result)
        return results, stops

    def _new_sample(self, request: _Request) -> _Sample:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                           request.params.skip_special_tokens)
        return _Sample(detok)

    def _append(self, request: _Request, sample: _Sample, out: SeqOutput) -> bool:
        """Adds the new tokens one at a time; True when a stop string ended the sample."""
        params = request.params
        for i, token_id in enumerate(out.new_token_ids):
            sample.token_ids.append(token_id)
            if out.new_logprobs is not None:
                sample.logprobs.append(out.new_logprobs[i])
            if sample.detokenizer is None:
                continue
            if out.finish_reason == "stop" and i == len(out.new_token_ids) - 1:
                break                        # EOS or a stop token id: in the ids, not in the text
            before = len(sample.text)
            sample.text += sample.detokenizer.step([token_id])
            if params.stop and len(sample.text) > before and self._match_stop(sample, params, before):
                return True
        if out.finish_reason is not None:
            sample.finish_reason = out.finish_reason
            sample.stop_reason = out.stop_token_id
            if sample.detokenizer is not None:
                sample.text += sample.detokenizer.flush()
        return False

    @staticmethod
    def _match_stop(sample: _Sample, params: SamplingParams, before: int) -> bool:
        longest = max(len(s) for s in params.stop)
        start = max(0, before - longest + 1)
        found = [(sample.text.find(s, start), s) for s in params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return False
        index, stop = min(found)
        sample.text = sample.text[:index]          # the stop string is not part of the answer
        sample.finish_reason, sample.stop_reason = "stop", stop
        return True

    def _collect(self, request: _Request, indexes: list[int]) -> RequestOutput | None:
        completions = []
        params = request.params
        for index in indexes:
            sample = request.samples[index]
            if sample.is_reported_finished:
                continue
            finished = sample.finish_reason is not None
            safe_end = len(sample.text)
            if not finished and params.stop:
                # hold back a tail that could still become a stop string
                safe_end -= max(len(s) for s in params.stop) - 1
            new_text = (sample.text[sample.num_emitted_chars:safe_end]
                        if safe_end > sample.num_emitted_chars else "")
            sample.num_emitted_chars += len(new_text)
            new_ids = sample.token_ids[sample.num_emitted_tokens:]
            new_logprobs = (sample.logprobs[sample.num_emitted_tokens:]
                            if params.logprobs is not None else None)
            sample.num_emitted_tokens = len(sample.token_ids)
            sample.is_reported_finished = finished
            completions.append(CompletionOutput(
                index=index, new_token_ids=new_ids, new_text=new_text, new_logprobs=new_logprobs,
                finish_reason=sample.finish_reason, stop_reason=sample.stop_reason,
                num_output_tokens=len(sample.token_ids)))
        done = ((len(request.samples) == params.n or request.is_core_done)
                and all(s.is_reported_finished for s in request.samples.values()))
        if done:
            request.metrics.finished_s = time.monotonic()
            del self.requests[request.request_id]
        if not completions and not done:
            return None
        return RequestOutput(request.request_id, completions, done, len(request.prompt_token_ids),
                             request.num_cached_tokens, request.metrics)
