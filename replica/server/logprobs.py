"""Token logprobs in the shapes clients read; the one place that builds them.

Chat completions and Ollama share one item shape (`token`, `logprob`, `bytes`,
`top_logprobs`); the legacy completions API has its own parallel lists. `token_text` turns a
token id into how it reads on its own (the replica's cached decoder).
"""
from collections.abc import Callable

from replica.outputs import TokenLogprob

TokenText = Callable[[int], str]


def logprob_items(token_text: TokenText, logprobs: list[TokenLogprob]) -> list[dict]:
    """OpenAI chat's `logprobs.content` items, which Ollama's `logprobs` uses too."""
    def entry(token_id: int, logprob: float) -> dict:
        token = token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, l) for t, l in lp.top]}
            for lp in logprobs]


def completion_logprobs(token_text: TokenText, logprobs: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's legacy shape; `text_offset` counts characters from the completion's start."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for lp in logprobs:
        token = token_text(lp.token_id)
        tokens.append(token)
        token_logprobs.append(lp.logprob)
        top = {token_text(tid): tlp for tid, tlp in lp.top}
        top.setdefault(token, lp.logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}
