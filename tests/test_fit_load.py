"""Fit equals Load, atomic Load, budgets (docs/design.md, invariants 1-3 and 7)."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compute.backend import AllocationError
from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from service.common.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from service.fit.cache_layout import BLOCK_TOKENS, kv_token_bytes
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig, derive_pair_params, fill_defaults
from tests.ggml_backend import make_ggml
from tests.tiny_gguf import tiny_vocab, write_tiny_llama

BACKENDS = ["numpy", "ggml"]
try:  # the OpenCL backend joins every property test when PyOpenCL finds a device
    from compute.opencl.backend import OpenCLBackend
    from tests.opencl_runtimes import usable_device

    OPENCL_DEVICE = usable_device()
    if OPENCL_DEVICE is not None:
        BACKENDS.append("opencl")
except Exception:  # noqa: BLE001 - no OpenCL runtime: numpy only
    pass


def make_backend(name: str):
    if name == "ggml":
        return make_ggml()
    return NumpyBackend(n_threads=1) if name == "numpy" else OpenCLBackend(device=OPENCL_DEVICE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "target": write_tiny_llama(d / "target.gguf", n_layer=2, seed=1),
        "draft": write_tiny_llama(d / "draft.gguf", n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64, seed=2),
        "other_vocab": write_tiny_llama(d / "other.gguf", n_layer=1, seed=3, extra_tokens=5),
        # gemma3, window 5: layers 0, 1, 3 local (rings of window + n_batch cells), layer 2 global
        "windowed": write_tiny_llama(d / "windowed.gguf", arch="gemma3", head_dim=32, n_layer=4, sliding_window=5,
                                     swa_pattern=3, seed=5),
        "qwen3": write_tiny_llama(d / "qwen3.gguf", arch="qwen3", head_dim=32, n_layer=2, seed=7),
        "windowed_draft": write_tiny_llama(d / "windowed_draft.gguf", arch="gemma3", n_layer=2, sliding_window=3,
                                           swa_pattern=2, seed=6),
        "q4": write_tiny_llama(d / "q4.gguf", n_layer=1, seed=4,
                               matrix_type=__import__("gguf").GGMLQuantizationType.Q4_1, tied=False),
        "dir": str(d),
    }


def sorted_specs(specs):
    return sorted(specs, key=repr)


params_st = st.builds(
    ContextParams,
    n_ctx=st.integers(1, 300),
    n_parallel=st.integers(1, 4),
    n_batch=st.integers(1, 64),
    kv_type=st.sampled_from(["f32", "f16"]),
    prompt_cache_bytes=st.one_of(st.none(), st.integers(0, 1 << 22)),  # None: the default; 0: none
    ngram_cache_tokens=st.one_of(st.none(), st.integers(0, 1 << 16)),
)
spec_st = st.builds(SpeculativeConfig, type=st.sampled_from(["none", "ngram", "draft"]), n_max=st.integers(0, 8),
                    n_min=st.just(0))


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=params_st, spec=spec_st, with_draft=st.booleans(), target=st.sampled_from(["target", "qwen3", "windowed"]),
       draft=st.sampled_from(["draft", "windowed_draft"]))
def test_ledger_equals_plan_on_tiny_models(tiny, backend_name, base, spec, with_draft, target, draft):
    """After Load the ledger holds exactly the plan's buffers, byte for byte; Unload empties it. With
    sliding-window models among them: their local layers' KV is planned at window + n_batch cells."""
    if base.n_ctx < base.n_parallel:
        base = replace(base, n_ctx=base.n_parallel)
    if spec.type == "draft" and not with_draft:
        spec = replace(spec, type="ngram")
    be = make_backend(backend_name)
    f = PairFactory(be, device_memory_bytes=1 << 34)
    req = PairRequest(target_path=tiny[target], draft_path=tiny[draft] if with_draft else "", params=base,
                      speculative=spec)
    fit = f.fit(req)
    assert fit.fits and not fit.adjustments
    pair = f.load(req)
    assert sorted_specs(be.ledger.entries("default")) == sorted_specs(fit.plan.specs())
    # the pair's caches are planned buffers: the store in whole blocks within its bytes, the index exactly
    tp = fit.plan.params.target
    store = [s for s in fit.plan.specs() if s.kind == "prompt_cache"]
    assert sum(s.nbytes for s in store) <= tp.prompt_cache_bytes
    models = [pair.target.file] + ([pair.draft.file] if with_draft else [])
    assert bool(store) == (tp.prompt_cache_bytes >= sum(BLOCK_TOKENS * kv_token_bytes(m.hparams, tp.kv_type)
                                                        for m in models))
    assert [s.nbytes for s in fit.plan.specs() if s.kind == "ngram_cache"] == \
        ([4 * tp.ngram_cache_tokens] if tp.ngram_cache_tokens else [])
    assert sorted_specs(pair.allocated()) == sorted_specs(fit.plan.specs())
    kv = sum(s.nbytes for s in fit.plan.specs("target") if s.kind == "kv_cache")
    assert kv == _kv_bytes(pair.target.file.hparams, tp)
    # the contexts are shaped by the plan's params, the draft's included
    p = fit.plan.params
    assert pair.target.context.n_outputs_max == p.target.n_outputs_max
    if with_draft:
        assert pair.draft.context.n_outputs_max == p.draft.n_outputs_max == min(base.n_parallel, p.draft.n_batch)
    pair.release()
    assert be.ledger.entries() == []


def _kv_bytes(hp, cp) -> int:
    """K and V bytes written out: a global layer keeps n_ctx_slot cells per slot, a local one
    min(n_ctx_slot, window + n_batch)."""
    cells = [min(cp.n_ctx_slot, hp.n_swa + cp.n_batch) if hp.is_swa(i) else cp.n_ctx_slot for i in range(hp.n_layer)]
    return 2 * cp.n_parallel * sum(cells) * hp.n_embd_kv * (4 if cp.kv_type == "f32" else 2)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_ledger_equals_plan_on_the_real_model(real_model, backend_name):
    be = make_backend(backend_name)
    f = PairFactory(be, device_memory_bytes=1 << 34)
    for base, spec, draft in [
        (ContextParams(n_ctx=256, n_parallel=2, n_batch=32, kv_type="f16"), SpeculativeConfig("ngram", n_max=4), ""),
        (ContextParams(n_ctx=96, n_parallel=3, n_batch=7, kv_type="f32"), SpeculativeConfig("draft", n_max=8),
         real_model),
    ]:
        req = PairRequest(target_path=real_model, draft_path=draft, params=base, speculative=spec)
        fit = f.fit(req)
        pair = f.load(req)
        assert sorted_specs(be.ledger.entries()) == sorted_specs(fit.plan.specs())
        pair.release()
        assert be.ledger.entries() == []


def test_derivation_of_outputs():
    base = ContextParams(n_ctx=1024, n_parallel=4, n_batch=512)
    p = derive_pair_params(base, SpeculativeConfig("draft", n_max=8), has_draft_model=True)
    assert p.target.n_outputs_max == 4 * 9
    assert p.draft.n_outputs_max == 4  # the #25056 lesson: the draft decodes one token per slot per step
    assert p.draft.n_ctx == p.target.n_ctx and p.draft.n_batch == p.target.n_batch
    off = derive_pair_params(base, SpeculativeConfig("none", n_max=8), has_draft_model=False)
    assert off.target.n_outputs_max == 4 and off.draft is None
    capped = derive_pair_params(replace(base, n_batch=16), SpeculativeConfig("ngram", n_max=8), False)
    assert capped.target.n_outputs_max == 16


def _generate_logits(pair, tokens=(5, 6, 7, 8)):
    ctx = pair.target.context
    n = len(tokens)
    return ctx.decode(Batch.make(tokens, range(n), [0] * n, [n - 1]))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("backend_name", ["numpy", "ggml"])
@pytest.mark.parametrize("models", [("target", "draft"), ("windowed", "windowed_draft")])
def test_fault_at_every_allocation_leaves_nothing_behind(tiny, backend_name, models):
    """Fail the k-th allocation of a Load for every k: the ledger returns to its exact previous state
    and a pair loaded before keeps generating the same logits."""
    be = make_backend(backend_name)
    f = PairFactory(be, device_memory_bytes=1 << 34)
    first = f.load(PairRequest(name="first", target_path=tiny[models[0]], speculative=SpeculativeConfig("none")))
    before_logits = _generate_logits(first)
    before = be.ledger.snapshot()
    req = PairRequest(name="second", target_path=tiny[models[0]], draft_path=tiny[models[1]],
                      speculative=SpeculativeConfig("draft", n_max=4))
    n_allocs = len(f.fit(req).plan.buffers)
    assert n_allocs > 10
    for k in range(n_allocs):
        calls = {"n": 0}

        def hook(spec, k=k):
            calls["n"] += 1
            if calls["n"] == k + 1:
                raise AllocationError(f"injected failure at allocation {k} ({spec.owner} {spec.kind} {spec.tag})")

        be.fault_hook = hook
        with pytest.raises(AllocationError):
            f.load(req)
        be.fault_hook = None
        assert be.ledger.snapshot() == before, f"leak after a failure at allocation {k}"
    np.testing.assert_array_equal(_generate_logits(first), before_logits)
    second = f.load(req)  # and with no fault it loads
    assert len(second.allocated()) == n_allocs
    second.release()
    assert be.ledger.snapshot() == before


@pytest.mark.parametrize("kind", ["prompt_cache", "ngram_cache"])
def test_a_fault_at_the_caches_allocation_leaves_the_ledger_as_it_was(tiny, kind):
    be = NumpyBackend(n_threads=1)
    f = PairFactory(be, device_memory_bytes=1 << 34)
    first = f.load(PairRequest(name="first", target_path=tiny["target"], speculative=SpeculativeConfig("none")))
    before = be.ledger.snapshot()
    req = PairRequest(name="second", target_path=tiny["target"], draft_path=tiny["draft"],
                      params=ContextParams(prompt_cache_bytes=1 << 20, ngram_cache_tokens=1000),
                      speculative=SpeculativeConfig("draft", n_max=4))
    hit = []

    def hook(spec):
        if spec.kind == kind:
            hit.append(spec)
            raise AllocationError(f"injected failure at the {spec.owner} {kind}")

    be.fault_hook = hook
    with pytest.raises(AllocationError):
        f.load(req)
    be.fault_hook = None
    assert hit and be.ledger.snapshot() == before
    second = f.load(req)
    assert {s.kind for s in second.allocated()} >= {"prompt_cache", "ngram_cache"}
    second.release()
    first.release()
    assert be.ledger.entries() == []


def test_the_prompt_store_counts_against_the_budget_where_it_shares_the_device(tiny):
    """NumPy's device is host memory: its store is planned on the device and Fit counts it."""
    f = PairFactory(NumpyBackend(n_threads=1))
    base = PairRequest(target_path=tiny["target"], params=ContextParams(n_ctx=64, prompt_cache_bytes=0))
    without = f.fit(replace(base, budget_bytes=1 << 40)).plan
    with_store = f.fit(replace(base, budget_bytes=1 << 40,
                               params=replace(base.params, prompt_cache_bytes=8 << 20))).plan
    store = sum(s.nbytes for s in with_store.specs() if s.kind == "prompt_cache")
    assert 0 < store <= 8 << 20 and with_store.device_bytes() == without.device_bytes() + store
    budget = int(with_store.device_bytes() / 0.98) - 1000  # just too small with the store
    fit = f.fit(replace(base, budget_bytes=budget, params=replace(base.params, prompt_cache_bytes=8 << 20)))
    assert not fit.fits or fit.adjustments


def test_draft_init_failure_releases_draft_model_and_context(tiny):
    be = NumpyBackend(n_threads=1)
    f = PairFactory(be, device_memory_bytes=1 << 34)
    before = be.ledger.snapshot()

    def fail():
        assert any(s.owner == "draft" and s.kind == "weights" for s in be.ledger.entries())
        assert any(s.owner == "draft" and s.kind == "kv_cache" for s in be.ledger.entries())
        raise Boom("speculative init failed")

    f.draft_init_hook = fail
    with pytest.raises(Boom):
        f.load(PairRequest(target_path=tiny["target"], draft_path=tiny["draft"],
                           speculative=SpeculativeConfig("draft", n_max=4)))
    assert be.ledger.snapshot() == before


def test_bad_draft_files_fail_before_allocating(tiny, tmp_path):
    be = NumpyBackend(n_threads=1)
    f = PairFactory(be, device_memory_bytes=1 << 34)
    with pytest.raises(InvalidArgument, match="vocabulary"):
        f.load(PairRequest(target_path=tiny["target"], draft_path=tiny["other_vocab"]))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(InvalidArgument, match="GGUF"):
        f.load(PairRequest(target_path=tiny["target"], draft_path=str(corrupt)))
    with pytest.raises(NotFound):
        f.load(PairRequest(target_path=tiny["target"], draft_path=str(tmp_path / "missing.gguf")))
    assert be.ledger.entries() == []


def test_same_token_texts_required(tiny, tmp_path):
    toks, types, merges = tiny_vocab()
    swapped = list(toks)
    swapped[10], swapped[11] = swapped[11], swapped[10]
    other = write_tiny_llama(tmp_path / "swapped.gguf", vocab=(swapped, types, merges), n_layer=1)
    f = PairFactory(NumpyBackend(n_threads=1), device_memory_bytes=1 << 34)
    with pytest.raises(InvalidArgument, match="token texts"):
        f.fit(PairRequest(target_path=tiny["target"], draft_path=other))


def test_models_dir_refuses_outside_paths(tiny, tmp_path):
    f = PairFactory(NumpyBackend(n_threads=1), models_dir=tiny["dir"], device_memory_bytes=1 << 34)
    outside = write_tiny_llama(tmp_path / "outside.gguf", n_layer=1)
    with pytest.raises(PermissionDenied):
        f.fit(PairRequest(target_path=outside))
    with pytest.raises(PermissionDenied):
        f.fit(PairRequest(target_path="../" + os.path.basename(os.path.dirname(outside)) + "/outside.gguf"))
    assert f.fit(PairRequest(target_path="target.gguf")).fits  # relative to the models dir


def _budget_for(f, req, n_ctx):
    """The budget at which a plan with this n_ctx exactly fits (the margin added back)."""
    from service.fit.factory import MARGIN_FRACTION

    plan = f.fit(replace(req, params=replace(req.params, n_ctx=n_ctx), budget_bytes=1 << 40)).plan
    return int(plan.device_bytes() / (1 - MARGIN_FRACTION)) + 2


def test_budget_fits_unchanged(tiny):
    f = PairFactory(NumpyBackend(n_threads=1))
    req = PairRequest(target_path=tiny["target"], params=ContextParams(n_ctx=256, n_parallel=2))
    fit = f.fit(replace(req, budget_bytes=_budget_for(f, req, 256)))
    assert fit.fits and fit.adjustments == () and fit.plan.params.target.n_ctx == 256


def test_budget_forces_smaller_context(tiny):
    f = PairFactory(NumpyBackend(n_threads=1))
    req = PairRequest(target_path=tiny["target"], params=ContextParams(n_ctx=256, n_parallel=2))
    fit = f.fit(replace(req, budget_bytes=_budget_for(f, req, 100)))
    assert fit.fits
    assert fit.plan.params.target.n_ctx == 100
    assert any("n_ctx reduced from 256 to 100" in a for a in fit.adjustments)
    # Load takes exactly what that adjusted Fit planned
    be = f.backend
    pair = f.load(replace(req, budget_bytes=_budget_for(f, req, 100)))
    assert sorted_specs(be.ledger.entries()) == sorted_specs(fit.plan.specs())
    pair.release()


def test_budget_cannot_fit_reports_deficit(tiny):
    f = PairFactory(NumpyBackend(n_threads=1))
    req = PairRequest(target_path=tiny["target"], params=ContextParams(n_ctx=256, n_parallel=2, n_ctx_min=200))
    budget = _budget_for(f, req, 100)  # fits n_ctx 100, but the floor is 200
    fit = f.fit(replace(req, budget_bytes=budget))
    assert not fit.fits
    assert fit.max_n_ctx == 100
    at_floor = f.fit(replace(req, budget_bytes=1 << 40, params=replace(req.params, n_ctx=200))).plan.device_bytes()
    assert fit.deficit_bytes == at_floor - fit.available_bytes > 0
    err = fit.error()
    assert isinstance(err, ResourceExhausted) and str(fit.deficit_bytes) in str(err) and "100" in str(err)
    with pytest.raises(ResourceExhausted):
        f.load(replace(req, budget_bytes=budget))
    assert f.backend.ledger.entries() == []
    weights_only = f.fit(replace(req, budget_bytes=1000))
    assert not weights_only.fits and weights_only.max_n_ctx == 0


def test_loaded_pairs_count_against_the_budget(tiny):
    f = PairFactory(NumpyBackend(n_threads=1))
    req = PairRequest(name="a", target_path=tiny["target"], params=ContextParams(n_ctx=64))
    one = f.fit(replace(req, budget_bytes=1 << 40)).plan.device_bytes()
    budget = int(2.5 * one / 0.98)
    a = f.load(replace(req, budget_bytes=budget))
    b = f.load(replace(req, name="b", budget_bytes=budget))
    third = f.fit(replace(req, name="c", budget_bytes=budget))
    assert third.available_bytes == int(budget * 0.98) - 2 * one
    assert not third.fits or third.adjustments  # only half a pair is left
    a.release()
    b.release()
    assert f.backend.ledger.entries() == []


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


GEMMA3_270M_METADATA = {  # the metadata of Gemma 3 270M's GGUF (general.name "Gemma 3 270m")
    "general.architecture": "gemma3", "gemma3.context_length": 32768, "gemma3.embedding_length": 640,
    "gemma3.block_count": 18, "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
    "gemma3.attention.sliding_window": 512,
}


def test_a_32k_context_of_gemma3_270m_plans_over_4x_less_kv_than_without_its_window(capsys):
    """18 layers, 3 global (every 6th): at 32,768 cells and 1 slot the 15 local layers keep 512 + n_batch
    cells each, the KV plan (Fit's kv_cache buffers, as Load allocates them) against n_ctx cells in all."""
    from compute.gguf_model import hparams_from_fields
    from compute.llama import kv_layout, layout_nbytes

    hp = hparams_from_fields({k: _Field(v) for k, v in GEMMA3_270M_METADATA.items()}, {}, 262144)
    assert sum(hp.is_swa(i) for i in range(18)) == 15 and not hp.is_swa(5) and not hp.is_swa(17)
    base = fill_defaults(ContextParams(n_ctx=32768, n_parallel=1), hp.n_ctx_train)  # n_batch: the default
    cp = derive_pair_params(base, SpeculativeConfig("none"), False).target
    windowed = 2 * layout_nbytes(kv_layout(hp, 1, cp.n_ctx_slot, cp.kv_type, cp.n_batch))
    full = 2 * layout_nbytes(kv_layout(replace(hp, n_swa=0), 1, cp.n_ctx_slot, cp.kv_type, cp.n_batch))
    assert windowed == _kv_bytes(hp, cp)
    with capsys.disabled():
        print(f"\nGemma 3 270M, n_ctx {cp.n_ctx_slot}, 1 slot, n_batch {cp.n_batch}, KV {cp.kv_type}: "
              f"{windowed / 2**20:.1f} MiB planned with the window, {full / 2**20:.1f} MiB without "
              f"({full / windowed:.2f}x less)")
    assert full >= 4 * windowed
