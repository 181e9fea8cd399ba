"""The rules the frozen params dataclasses enforce when they are built, whichever door builds them
(gRPC convert.py, `specserve serve` / `run` flags, a future HTTP door), and the status code of each."""

from __future__ import annotations

import math

import pytest

from service.common.errors import FailedPrecondition, InvalidArgument
from service.engine.request import GenRequest, SamplingParams
from service.fit.params import ContextParams, SpeculativeConfig, check_draft_model, derive_pair_params


@pytest.mark.parametrize("fields, needle", [
    (dict(type="eagle"), "speculative type 'eagle'"),
    (dict(n_max=-1, n_min=0), "n_max and n_min must be >= 0"),
    (dict(n_min=-1), "n_max and n_min must be >= 0"),
    (dict(n_max=2, n_min=3), "n_min (3) must be <= n_max (2)"),
    (dict(p_min=1.5), "p_min (1.5) must be within [0, 1]"),
    (dict(p_min=-0.1), "p_min"),
    (dict(p_min=math.nan), "p_min"),
    (dict(ngram_min=0), "1 <= ngram_min <= ngram_max"),
    (dict(ngram_min=3, ngram_max=2), "1 <= ngram_min <= ngram_max"),
])
def test_malformed_speculative_config_is_invalid_argument(fields, needle):
    with pytest.raises(InvalidArgument) as e:
        SpeculativeConfig(**fields)
    assert needle in str(e.value) and e.value.code == "INVALID_ARGUMENT"


def test_speculative_config_checks_replace_too():
    """dataclasses.replace builds a new object: the changes that convert.py and the CLI apply are checked."""
    from dataclasses import replace

    with pytest.raises(InvalidArgument, match="n_min"):
        replace(SpeculativeConfig(), n_max=0)
    assert replace(SpeculativeConfig(), n_max=0, n_min=0).enabled is False


@pytest.mark.parametrize("fields", [dict(), dict(type="none", n_max=0, n_min=0), dict(p_min=0.0), dict(p_min=1.0),
                                    dict(ngram_min=1, ngram_max=1), dict(type="draft", n_max=1, n_min=1)])
def test_well_formed_speculative_configs_are_taken(fields):
    assert SpeculativeConfig(**fields)


def test_draft_type_without_a_draft_model_code_depends_on_whose_state():
    """A pair being made from a spec that names no draft model: INVALID_ARGUMENT (the spec contradicts
    itself). A loaded pair without one: FAILED_PRECONDITION (load it with a draft model first)."""
    draft = SpeculativeConfig("draft", n_max=4)
    with pytest.raises(InvalidArgument, match="needs a draft model") as e:
        check_draft_model(draft, has_draft_model=False, pair_loaded=False)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(FailedPrecondition, match="needs a pair loaded with a draft model") as e:
        check_draft_model(draft, has_draft_model=False, pair_loaded=True)
    assert e.value.code == "FAILED_PRECONDITION"
    for loaded in (False, True):
        check_draft_model(draft, has_draft_model=True, pair_loaded=loaded)
        check_draft_model(SpeculativeConfig("ngram"), has_draft_model=False, pair_loaded=loaded)
    with pytest.raises(InvalidArgument, match="draft_path"):  # the derivation uses the same rule
        derive_pair_params(ContextParams(n_ctx=64, n_batch=8), draft, has_draft_model=False)


@pytest.mark.parametrize("fields, needle", [
    (dict(temperature=-1.0), "sampling.temperature -1.0: must be >= 0 (0 = greedy)"),
    (dict(temperature=math.inf), "sampling.temperature must be a finite number"),
    (dict(temperature=math.nan), "sampling.temperature must be a finite number"),
    (dict(top_p=0.0), "sampling.top_p 0.0: must be within (0, 1] (1 = off)"),
    (dict(top_p=1.5), "sampling.top_p 1.5"),
    (dict(min_p=-0.1), "sampling.min_p -0.1: must be within [0, 1] (0 = off)"),
    (dict(min_p=2.0), "sampling.min_p 2.0"),
    (dict(repeat_penalty=0.0), "sampling.repeat_penalty 0.0: must be > 0 (1 = off)"),
    (dict(repeat_penalty=math.nan), "sampling.repeat_penalty must be a finite number"),
])
def test_bad_sampling_params_are_invalid_argument(fields, needle):
    with pytest.raises(InvalidArgument) as e:
        SamplingParams(**fields)
    assert needle in str(e.value) and e.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("fields", [dict(), dict(temperature=0.0), dict(top_p=1.0), dict(min_p=0.0), dict(min_p=1.0),
                                    dict(top_k=0), dict(repeat_last_n=-1), dict(seed=7)])
def test_edge_sampling_params_are_taken(fields):
    assert SamplingParams(**fields)


@pytest.mark.parametrize("fields, needle", [(dict(max_tokens=-1), "max_tokens must be >= 0"),
                                            (dict(stop=("ok", "")), "stop: a stop string is empty")])
def test_bad_gen_request_is_invalid_argument(fields, needle):
    with pytest.raises(InvalidArgument, match=needle) as e:
        GenRequest((1, 2, 3), **fields)
    assert e.value.code == "INVALID_ARGUMENT"
    assert GenRequest((1, 2, 3), max_tokens=0, stop=("x",)).max_tokens == 0
