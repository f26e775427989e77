"""The strictness every OpenAI-side request body shares: no "1" for 1, no NaN, no unknown field."""
from pydantic import BaseModel, ConfigDict


class RequestBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
