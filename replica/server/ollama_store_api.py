"""What Ollama's store says about the served model, as the Ollama routes apply it, and the
routes that would change the store, refused.

- The params layer gives default options and the system layer the default system message;
  what a request sends wins, option by option, as in Ollama, on the Ollama routes and on
  OpenAI's (whose bodies get the same options under their OpenAI names). Params this replica cannot honour
  (a value out of range) are dropped at start-up with a warning, never turned into a 400 for
  a request that did nothing wrong.
- `/api/pull`, `/api/push`, `/api/create`, `/api/copy` and `/api/delete` answer 501 in Ollama's
  error shape with what to do instead: the store belongs to Ollama; pagefleet only reads it.
"""
import json
import logging
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import ValidationError

from replica.models import ollama_store
from replica.models.ollama_store import OllamaModel
from replica.models.registry import BUNDLED
from replica.server.errors import APIError
from replica.server.ollama_protocol import OllamaOptions

log = logging.getLogger("replica.server")

# Ollama option → the OpenAI body field that means the same.
_OPENAI_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
                  "frequency_penalty": "frequency_penalty", "repeat_penalty": "repetition_penalty",
                  "num_predict": "max_tokens"}


@dataclass
class StoreDefaults:
    """The served model's entry in Ollama's store (None when it is not served from the store)
    and the defaults its layers give."""
    model: OllamaModel | None = None
    options: dict = field(default_factory=dict)     # OllamaOptions fields from the params layer

    @property
    def system(self) -> str | None:
        return self.model.system if self.model else None

    def options_for(self, requested: OllamaOptions | None) -> OllamaOptions | None:
        """The params layer's options overridden by the request's own, key by key."""
        if not self.options:
            return requested
        sent = requested.model_dump(exclude_unset=True) if requested is not None else {}
        return OllamaOptions.model_validate({**self.options, **sent})

    def with_openai_defaults(self, body):
        """An OpenAI request body with the params layer's options in the fields it left unset
        (Ollama applies a model's params to its OpenAI routes too)."""
        update = {}
        for key, value in self.options.items():
            name = _OPENAI_FIELDS.get(key)
            if name and name not in body.model_fields_set and name in type(body).model_fields:
                if key != "num_predict" or value > 0:
                    update[name] = value
        return body.model_copy(update=update) if update else body

    def with_system(self, messages: list[dict]) -> list[dict]:
        """Chat messages with the model's system message first, unless they bring their own."""
        if not self.system or any(m["role"] == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self.system}] + messages

    def parameters_text(self) -> str | None:
        """/api/show's `parameters`: one `key value` line per option, a stop word a line."""
        if self.model is None or not self.model.params:
            return None
        lines = []
        for key, value in self.model.params.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"{key:<30} {json.dumps(item) if isinstance(item, str) else item}")
        return "\n".join(lines)


    def modelfile(self) -> str | None:
        """/api/show's `modelfile`, in Ollama's own syntax (FROM the blob, then the layers)."""
        m = self.model
        if m is None:
            return None
        lines = [f"# served by pagefleet from Ollama's store: {m.name.display}",
                 f"FROM {m.model_path}"]
        for keyword, text in (("TEMPLATE", m.template), ("SYSTEM", m.system)):
            if text:
                lines.append(f'{keyword} """{text}"""')
        for key, value in m.params.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {key} {item}")
        if m.license:
            lines.append(f'LICENSE """{m.license}"""')
        return "\n".join(lines) + "\n"


def store_defaults(model: str, served_name: str | None = None) -> StoreDefaults:
    """Reads the store once at start-up: `model` is a store name or a blob of the store (then
    `served_name` picks among the manifests sharing it); other models have no defaults."""
    entry = None if model in BUNDLED else ollama_store.lookup(model, served_name=served_name)
    if entry is None:
        return StoreDefaults()
    options = {}
    for key, value in entry.params.items():
        try:
            OllamaOptions.model_validate({key: value})
        except ValidationError:
            log.warning("%s: params layer option %s=%r is out of range here; ignored",
                        entry.name.display, key, value)
            continue
        if key in OllamaOptions.model_fields:
            options[key] = value
    return StoreDefaults(entry, options)


# ---- routes that would change the store ---------------------------------------------------

_INSTEAD = {
    "/api/pull": "pull the model with Ollama (`ollama pull NAME`), then serve it with "
                 "`replica serve --model NAME` (pagefleet reads Ollama's store)",
    "/api/push": "push with Ollama (`ollama push NAME`); pagefleet only serves the store",
    "/api/create": "create the model with Ollama (`ollama create NAME -f Modelfile`), then "
                   "serve it with `replica serve --model NAME`",
    "/api/copy": "copy with Ollama (`ollama cp SOURCE DESTINATION`); pagefleet only reads the store",
    "/api/delete": "delete with Ollama (`ollama rm NAME`); pagefleet only reads the store",
}


async def store_change_refused(request: web.Request) -> web.Response:
    raise APIError(501, f"{request.path} is not available on pagefleet: "
                        f"{_INSTEAD[request.path]}", code="not_implemented")


STORE_CHANGES = tuple(_INSTEAD)        # the paths; replica/server/routes.py registers them
