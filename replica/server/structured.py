"""Request fields that constrain the output → one `StructuredOutputSpec`, checked here so that a
bad schema, pattern or grammar is a 400 naming the field (the engine compiles what passes).

Accepted: OpenAI's `response_format` (text, json_object, json_schema); vLLM's
`structured_outputs: {json | regex | choice | grammar}` and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`; Ollama's `format` ("json" or a schema).
Schemas are checked twice: as JSON Schema (the `jsonschema` package: is it a schema at all?)
and against what the grammar compiler enforces; keywords it would silently ignore are refused,
so that "the output validates against the schema" stays true.
"""
import json
import re

from replica.sampling_params import StructuredOutputSpec
from replica.server.errors import bad_request

# Keywords xgrammar accepts but does not enforce: refusing them keeps outputs valid.
UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "allOf", "uniqueItems", "contains",
                        "minContains", "maxContains", "multipleOf", "dependentRequired",
                        "dependentSchemas", "unevaluatedProperties", "unevaluatedItems",
                        "propertyNames")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")
_MAX_SCHEMA_BYTES = 256 * 1024


def _compiler_message(err: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location, kept short."""
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(err)).strip().splitlines()
    return (text[0] if text else "rejected")[:200]


def _find_unsupported(schema, path: str) -> tuple[str, str] | None:
    """(keyword, where) of the first keyword the compiler would ignore, walking subschemas only."""
    if not isinstance(schema, dict):
        return None
    for key in UNSUPPORTED_KEYWORDS:
        if key in schema:
            return key, path
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            if (found := _find_unsupported(sub, f"{path}.{key}.{name}")):
                return found
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []) if isinstance(schema.get(key), list) else ():
            if (found := _find_unsupported(sub, f"{path}.{key}[{i}]")):
                return found
    for key in _SCHEMA_VALUES:
        if (found := _find_unsupported(schema.get(key), f"{path}.{key}")):
            return found
    return None


def check_json_schema(schema, param: str) -> str:
    """The schema as JSON text, or a 400 naming `param` and the problem."""
    import jsonschema
    import xgrammar as xgr

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise bad_request(f"{param}: is not valid JSON", param) from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{param}: a JSON schema must be an object", param)
    text = json.dumps(schema)
    if len(text) > _MAX_SCHEMA_BYTES:
        raise bad_request(f"{param}: schema is over {_MAX_SCHEMA_BYTES} bytes", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.path) or "top level"
        raise bad_request(f"{param}: invalid JSON schema at {where}: {err.message[:200]}",
                          param) from None
    if (found := _find_unsupported(schema, param)):
        keyword, where = found
        raise bad_request(f"{where}: the schema keyword '{keyword}' is not supported by "
                          "constrained decoding", param)
    try:
        xgr.Grammar.from_json_schema(text, any_whitespace=False)
    except Exception as err:          # the compiler's own refusals (types, $ref, bounds)
        raise bad_request(f"{param}: unsupported JSON schema: {_compiler_message(err)}",
                          param) from None
    return text


def check_regex(pattern: str, param: str) -> str:
    import xgrammar as xgr

    try:
        xgr.Grammar.from_regex(pattern)
    except Exception as err:
        raise bad_request(f"{param}: unsupported regular expression: {_compiler_message(err)}",
                          param) from None
    return pattern


def check_grammar(ebnf: str, param: str) -> str:
    import xgrammar as xgr

    try:
        xgr.Grammar.from_ebnf(ebnf)
    except Exception as err:
        raise bad_request(f"{param}: invalid EBNF grammar: {_compiler_message(err)}", param) from None
    return ebnf


def check_choice(choices: list[str], param: str) -> tuple[str, ...]:
    if not choices or not all(choices):
        raise bad_request(f"{param}: needs at least one non-empty string", param)
    return tuple(choices)


def from_openai(body) -> StructuredOutputSpec | None:
    """The one constraint of a completions or chat body (at most one may be given)."""
    specs: list[StructuredOutputSpec] = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type == "json_object":
        specs.append(StructuredOutputSpec("json_object"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request("response_format.json_schema: field required",
                              "response_format.json_schema")
        schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {"type": "object"}
        specs.append(StructuredOutputSpec("json_schema", check_json_schema(
            schema, "response_format.json_schema.schema")))
    if body.structured_outputs is not None:
        for name, value in body.structured_outputs.given().items():
            specs.append(_vllm_spec(name, value, f"structured_outputs.{name}"))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{name}")
        if value is not None:
            specs.append(_vllm_spec(name, value, f"guided_{name}"))
    if len(specs) > 1:
        raise bad_request("response_format: give one constraint (response_format, "
                          "structured_outputs or guided_*), not several", "response_format")
    return specs[0] if specs else None


def _vllm_spec(name: str, value, param: str) -> StructuredOutputSpec:
    if name == "json_object":
        return StructuredOutputSpec("json_object")
    if name == "json":
        return StructuredOutputSpec("json_schema", check_json_schema(value, param))
    if name == "regex":
        return StructuredOutputSpec("regex", check_regex(value, param))
    if name == "choice":
        return StructuredOutputSpec("choice", check_choice(value, param))
    return StructuredOutputSpec("grammar", check_grammar(value, param))


def from_ollama(fmt) -> StructuredOutputSpec | None:
    """Ollama's `format`: "" or None (free text), "json" (any JSON object), or a schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return StructuredOutputSpec("json_object")
    return StructuredOutputSpec("json_schema", check_json_schema(fmt, "format"))
