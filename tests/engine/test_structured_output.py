"""Constrained decoding on a random tiny model: whatever the weights prefer, the output follows
the grammar. Schemas are generated (hypothesis) with every path bounded (string lengths, item
counts, integer ranges), so that a random model always reaches the end of the grammar.

Also the batch's mechanics: unconstrained rows beside constrained ones keep their tokens and
their overlap; ids past the tokenizer (a padded embedding) are never sampled under a grammar,
and the mask equals the per-row one xgrammar makes at the model's full width; a grammar that has
completed costs nothing more."""
import json
import shutil

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from replica.engine.sequence import Sequence
from replica.engine.structured_output import StructuredOutputs, json_schema_ebnf
from replica.sampling_params import SamplingParams, StructuredOutputSpec
from tests.engine.conftest import TINY_ENGINE
from tests.tiny_models import SMOLLM2_VOCAB, make_tiny_model, smollm2_tokenizer_dir

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


# W7's schema (../shared/WORKLOADS.md), with bounds so that a random model finishes it
W7_BOUNDED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "kind": {"enum": ["person", "place"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "kind", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(llm_factory, text_model_path):
    return llm_factory(text_model_path, **ENGINE)


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


def test_a_mixed_batch_keeps_its_overlap_and_the_unconstrained_rows_their_tokens(llm, llm_factory,
                                                                                 text_model_path):
    prompts = ["The weather", "x", "Once upon", "JSON:", "1 2 3", "a b"]
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    w7 = SamplingParams(temperature=0.0, max_tokens=120,
                        structured_output=StructuredOutputSpec("json_schema", json.dumps(W7_BOUNDED)))
    mixed = [w7 if i % 2 == 0 else plain for i in range(len(prompts))]
    unconstrained = [r.outputs[0].token_ids for r in llm.generate(prompts, plain)]
    llm.engine.num_overlapped_steps = 0
    results = llm.generate(prompts, mixed)
    assert llm.engine.num_overlapped_steps > 20, "steps with grammars still launch before reading"
    for i, result in enumerate(results):
        out = result.outputs[0]
        if i % 2:
            assert out.token_ids == unconstrained[i]
        else:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), W7_BOUNDED)
    sequential = llm_factory(text_model_path, **ENGINE, enable_overlap=False)
    again = sequential.generate(prompts, mixed)
    assert [r.outputs[0].token_ids for r in again] == [r.outputs[0].token_ids for r in results]


def test_a_completed_grammar_leaves_the_rest_of_an_ignore_eos_request_unmasked(llm):
    structured = llm.engine.structured
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            structured_output=StructuredOutputSpec("choice", ["yes", "no"]))
    before = structured.num_masked_tokens
    out = llm.generate(["Answer:"], params)[0].outputs[0]
    assert len(out.token_ids) == 12
    end = next(i for i, t in enumerate(out.token_ids) if t in llm.engine.eos_token_ids)
    assert llm.engine.tokenizer.decode(out.token_ids[:end]) in ("yes", "no")
    # masked up to and including the end token; the matcher has terminated after it
    assert structured.num_masked_tokens - before == end + 1


@pytest.fixture(scope="module")
def padded_model_path(tmp_path_factory):
    """The tiny Llama with 1,000 lm_head rows past SmolLM2's 49,152 tokens (checkpoints often pad
    their embedding), scaled up so that the unconstrained model prefers those ids."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-padded"), "llama", with_tokenizer=False,
                           vocab_size=SMOLLM2_VOCAB + 1000)
    for f in smollm2_tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"][SMOLLM2_VOCAB:] *= 20
    save_file(weights, path / "model.safetensors")
    return path


def test_ids_past_the_tokenizer_are_never_sampled_under_a_grammar(llm_factory, padded_model_path):
    padded = llm_factory(padded_model_path, **ENGINE)
    assert padded.engine.structured.grammar_vocab_size == SMOLLM2_VOCAB
    free = padded.generate(["x"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert any(t >= SMOLLM2_VOCAB for t in free[0].outputs[0].token_ids), "the padding is preferred"
    spec = StructuredOutputSpec("json_schema", json.dumps(W7_BOUNDED))
    params = [SamplingParams(temperature=t, seed=i, max_tokens=120, structured_output=spec)
              for i, t in enumerate([0.0, 1.0, 1.0])]
    for result in padded.generate(["x", "y", "z"], params):
        out = result.outputs[0]
        assert max(out.token_ids) < SMOLLM2_VOCAB
        jsonschema.validate(json.loads(out.text), W7_BOUNDED)


def test_the_mask_equals_xgrammars_per_row_mask_at_the_model_width(smollm2_tokenizer):
    """The engine's mask (grammar over the tokenizer's ids, the padding cut by a slice, one batched
    fill) forbids exactly what a per-row fill over the model's full width forbids."""
    import xgrammar as xgr

    width = SMOLLM2_VOCAB + 40
    eos = smollm2_tokenizer.eos_token_ids
    structured = StructuredOutputs(smollm2_tokenizer, width, eos, torch.device("cpu"), max_threads=2)
    spec = StructuredOutputSpec("json_schema", json.dumps(W7_BOUNDED))
    seqs = [Sequence(str(i), [1], SamplingParams(structured_output=spec), 0.0) for i in range(6)]
    info = xgr.TokenizerInfo.from_huggingface(smollm2_tokenizer.hf, vocab_size=width, stop_token_ids=eos)
    grammar = xgr.GrammarCompiler(info).compile_grammar(json_schema_ebnf(json.dumps(W7_BOUNDED)))
    reference = [xgr.GrammarMatcher(grammar) for _ in seqs]
    bitmask = xgr.allocate_token_bitmask(len(seqs), width)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows = [i for i, m in enumerate(reference) if not m.is_terminated()]
        mask = structured.allowed_mask(seqs)
        if not rows:
            assert mask is None
            break
        assert mask.rows.tolist() == rows
        ours, theirs = torch.rand(len(seqs), width, generator=gen), torch.zeros(len(seqs), width)
        theirs.copy_(ours)
        mask.apply(ours)
        for i in rows:
            reference[i].fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=rows)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        tokens = ours.argmax(dim=-1).tolist()      # a random walk through the grammar
        for i in rows:
            seqs[i].token_ids.append(tokens[i])
            assert reference[i].accept_token(tokens[i])
        structured.accept([seqs[i] for i in rows], [tokens[i] for i in rows])
    assert sum(m.is_terminated() for m in reference) > 0, "some walks reached the end"


def test_a_bitmask_being_copied_is_not_refilled(smollm2_tokenizer):
    """Two host buffers in turn: the mask of step t stays intact while step t+1's is filled."""
    structured = StructuredOutputs(smollm2_tokenizer, SMOLLM2_VOCAB, smollm2_tokenizer.eos_token_ids,
                                   torch.device("cpu"))
    spec = StructuredOutputSpec("choice", ["ab", "cd"])
    seq = Sequence("0", [1], SamplingParams(structured_output=spec), 0.0)
    first = structured.allowed_mask([seq])
    kept = first.bitmask.clone()
    token = smollm2_tokenizer.encode("a", add_special_tokens=False)[0]
    seq.token_ids.append(token)
    structured.accept([seq], [token])
    second = structured.allowed_mask([seq])
    assert second.bitmask.data_ptr() != first.bitmask.data_ptr()
    assert torch.equal(first.bitmask, kept) and not torch.equal(second.bitmask, kept)


def test_a_schema_the_compiler_refuses_is_a_value_error_naming_it(llm):
    bad = StructuredOutputSpec("json_schema", json.dumps({"type": "strin"}))
    with pytest.raises(ValueError, match="structured output: .*strin"):
        llm.generate(["x"], SamplingParams(structured_output=bad))
