"""LLM: the offline front door (`LLM(model).generate(prompts, params)`)."""
import itertools
from dataclasses import dataclass

from replica.config import EngineConfig
from replica.engine.engine import LLMEngine
from replica.outputs import Completion
from replica.sampling_params import SamplingParams


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    num_cached_tokens: int
    outputs: list[Completion]       # ordered by sample index


class LLM:
    def __init__(self, model: str = "smollm2", **config):
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationResult]:
        """prompts: a string, a list of strings, a list of token ids, or a list of those lists."""
        prompts = _as_prompt_list(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        results: dict[str, GenerationResult] = {}
        order = []
        encoded = [self._encode(prompt) for prompt in prompts]
        for ids, p in zip(encoded, params_list):     # all or nothing: check before adding any
            self.engine.validate(ids, p)
        for ids, p in zip(encoded, params_list):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, ids, p)
            results[request_id] = GenerationResult(request_id, ids, 0, [])
            order.append(request_id)
        self.run_until_done(results)
        return [results[r] for r in order]

    def run_until_done(self, results: dict[str, GenerationResult]) -> None:
        samples: dict[tuple[str, int], Completion] = {}
        while self.engine.has_unfinished:
            for out in self.engine.step():
                result = results[out.request_id]
                result.num_cached_tokens = out.num_cached_tokens
                for c in out.outputs:
                    key = (out.request_id, c.index)
                    if key not in samples:
                        samples[key] = Completion(c.index)
                        result.outputs.append(samples[key])
                    samples[key].add(c)
                result.outputs.sort(key=lambda c: c.index)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(prompts)
