"""LLMEngine: the engine core and its output processor in one process (offline use and tests).

step(): EngineCore.step() (token ids) → OutputProcessor.process() (text, stop strings) →
RequestOutput deltas; samples that matched a stop string are ended in the core at once. The
served path splits the same two halves across processes (`async_engine.py`, `core_proc.py`).
"""
import time

from replica.engine.core import EngineCore
from replica.engine.output_processor import OutputProcessor
from replica.outputs import RequestOutput
from replica.sampling_params import SamplingParams


class LLMEngine(EngineCore):
    def __init__(self, config, checkpoint=None):
        super().__init__(config, checkpoint)
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_s: float | None = None) -> None:
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        super().add_request(request_id, prompt_token_ids, params, arrival_s)
        self.output_processor.add_request(request_id, prompt_token_ids, params, arrival_s)

    def step(self) -> list[RequestOutput]:
        outputs, stops = self.output_processor.process(super().step())
        for stop in stops:
            self.stop_seq(stop.request_id, stop.index, stop.reason)
        return outputs
