"""Constrained decoding on a random tiny model: whatever the weights prefer, the output follows
the grammar. Schemas are generated (hypothesis) with every path bounded (string lengths, item
counts, integer ranges), so that a random model always reaches the end of the grammar."""
import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replica.engine.llm import LLM
from replica.sampling_params import SamplingParams, StructuredOutputSpec
from tests.engine.conftest import TINY_ENGINE

ENGINE = TINY_ENGINE | dict(max_model_len=512, num_kv_blocks=512)

_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-100, 100), st.integers(0, 1000)),
    st.builds(lambda xs: {"enum": xs}, st.lists(st.sampled_from(["a", "bc", "d e", 1, None, True]),
                                                min_size=1, max_size=4, unique=True)),
)


def _object(children):
    return st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), children,
                           min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))


def _array(children):
    return st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo,
                                               "maxItems": lo + extra},
                     children, st.integers(0, 2), st.integers(0, 2))


SCHEMAS = _object(st.recursive(_leaf, lambda c: st.one_of(_object(c), _array(c)), max_leaves=6))


@pytest.fixture(scope="module")
def llm(text_model_path):
    return LLM(str(text_model_path), **ENGINE)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_constrained_output_always_validates_greedy_and_sampled(llm, schema, seed):
    spec = StructuredOutputSpec("json_schema", json.dumps(schema))
    greedy = SamplingParams(temperature=0.0, max_tokens=300, structured_output=spec)
    sampled = SamplingParams(temperature=1.0, seed=seed, max_tokens=300, structured_output=spec)
    for result in llm.generate(["Answer in JSON:", "x"], [greedy, sampled]):
        out = result.outputs[0]
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_regex_and_choice_are_followed(llm):
    regex = SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                           structured_output=StructuredOutputSpec("regex", r"[0-9]{3}-[a-z]{2}"))
    choice = SamplingParams(temperature=1.0, seed=4, max_tokens=40, n=4,
                            structured_output=StructuredOutputSpec("choice", ["yes", 'no, "never"']))
    [r1, r2] = llm.generate(["a", "b"], [regex, choice])
    assert r1.outputs[0].text[:3].isdigit() and r1.outputs[0].text[3] == "-"
    assert len(r1.outputs[0].text) == 6
    assert {o.text for o in r2.outputs} <= {"yes", 'no, "never"'}


def test_an_unconstrained_request_beside_a_constrained_one_gets_the_same_tokens(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["The weather"], plain)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=0.0, max_tokens=24,
                                 structured_output=StructuredOutputSpec("json_object"))
    together = llm.generate(["The weather", "x"], [plain, constrained])
    assert together[0].outputs[0].token_ids == alone
    assert llm.engine.structured.allowed_mask([]) is None      # no constrained row: no mask


def test_a_schema_the_compiler_refuses_is_a_value_error_naming_it(llm):
    bad = StructuredOutputSpec("json_schema", json.dumps({"type": "strin"}))
    with pytest.raises(ValueError, match="structured output: .*strin"):
        llm.generate(["x"], SamplingParams(structured_output=bad))
