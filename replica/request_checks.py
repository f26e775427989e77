"""The checks a request must pass to be able to run, worded once for the engine and the server.

Each raises `RequestError` (a ValueError) whose message starts with the field it is about,
`"<field>: <rule>"`, and whose `param` names that field, so that the server turns it into a
400 naming the field and the offline `LLM` shows the same words.
"""


class RequestError(ValueError):
    def __init__(self, param: str, rule: str) -> None:
        super().__init__(f"{param}: {rule}")
        self.param = param


def check_prompt_token_ids(token_ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise RequestError(param, f"token ids must be in [0, {vocab_size})")


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                  param: str = "max_tokens") -> None:
    """The prompt plus `max_tokens` (None: the rest of the context) must fit in the context,
    with at least one token left to generate."""
    if num_prompt_tokens == 0:
        raise RequestError("prompt", "must contain at least one token")
    if num_prompt_tokens >= max_model_len:
        raise RequestError("prompt", f"{num_prompt_tokens} tokens leave no room to generate in "
                           f"this model's context of {max_model_len} tokens")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise RequestError(param, f"the prompt ({num_prompt_tokens} tokens) plus {param} "
                           f"({max_tokens}) is over the context length of {max_model_len} tokens")


def check_num_samples(n: int, limit: int, why: str) -> None:
    if n > limit:
        raise RequestError("n", f"must be <= {limit} ({why})")
