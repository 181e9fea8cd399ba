"""The OpenCL backend's per-call parameters live in the plan (docs/design.md, invariant 7).

Token ids, slots, positions, RoPE tables and gathered row indices are staged into
the p_* arrays of each context's planned compute scratch: decoding creates no cl.Buffer and
the ledger equals the plan before and after; two contexts decoding alternately get the same
logits as each alone (the "skip an unchanged upload" cache is per context array).
"""

from __future__ import annotations

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl")
pytest.importorskip("gguf")

from compute.llama import Batch, layout_nbytes, scratch_layout  # noqa: E402
from compute.opencl.backend import OpenCLBackend  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402
from tests.opencl_runtimes import usable_device  # noqa: E402
from tests.tiny_gguf import write_tiny_llama  # noqa: E402

pytestmark = pytest.mark.opencl
DEVICE = usable_device()
if DEVICE is None:
    pytest.skip("no working OpenCL device (tests/test_runtime.py says why)", allow_module_level=True)

PARAMS = ContextParams(n_ctx=128, n_parallel=2, n_batch=8, kv_type="f32")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("staging") / "tiny.gguf", n_layer=2, seed=5)


def _load(factory: PairFactory, model: str, name: str):
    req = PairRequest(name=name, target_path=model, params=PARAMS, speculative=SpeculativeConfig("none"))
    return factory.fit(req).plan, factory.load(req)


def _batches(ctx, seed: int) -> list[Batch]:
    """Prefills of both slots, then decode and verify batches of 1 .. n_batch rows."""
    rng = np.random.default_rng(seed)
    V, nb, no = ctx.hp.n_vocab, ctx.n_batch, ctx.n_outputs_max
    pos = [0, 0]
    out = []
    for rows, slots in [(nb, [0] * nb), (5, [1] * 5), (1, [0]), (2, [1, 1]), (nb, [0] * 3 + [1] * (nb - 3)),
                        (3, [0, 1, 0]), (1, [1]), (nb, [1] * nb)]:
        positions = []
        for s in slots:
            positions.append(pos[s])
            pos[s] += 1
        n_out = min(rows, no)
        outputs = sorted(rng.choice(rows, n_out, replace=False).tolist())
        out.append(Batch.make(rng.integers(0, V, rows), positions, slots, outputs))
    return out


def _count_buffers(monkeypatch) -> list:
    """Every cl.Buffer constructed from now on (the backend module's `cl` is pyopencl)."""
    made = []
    real = cl.Buffer

    def counting(*a, **k):
        made.append(a)
        return real(*a, **k)

    monkeypatch.setattr(cl, "Buffer", counting)
    return made


def test_param_arrays_are_in_the_scratch_plan(model):
    be = OpenCLBackend(device=DEVICE)
    factory = PairFactory(be, device_memory_bytes=1 << 34)
    plan, pair = _load(factory, model, "p")
    try:
        ctx = pair.target.context
        hp = ctx.hp
        params = be.param_layout(hp, ctx.n_batch, ctx.n_outputs_max)
        assert set(params) == {"p_ids", "p_slots", "p_positions", "p_rows", "p_cos", "p_sin"}
        lay = scratch_layout(hp, ctx.n_batch, ctx.n_outputs_max, be.scratch_row_multiple(), params)
        scratch = [s for s in plan.specs() if s.owner == "target" and s.kind == "compute"]
        assert [s.nbytes for s in scratch] == [layout_nbytes(lay)]
        assert layout_nbytes(lay) > layout_nbytes(scratch_layout(hp, ctx.n_batch, ctx.n_outputs_max, 1))
        for name in params:  # the context's scratch holds every planned parameter array
            assert ctx.s[name].shape == params[name][0]
        # each holds the largest call's parameters
        half = hp.rope_dim // 2
        assert ctx.s["p_ids"].size >= ctx.n_batch and ctx.s["p_cos"].size >= ctx.n_batch * half
        assert ctx.s["p_rows"].size >= ctx.n_outputs_max
    finally:
        pair.release()
    assert be.ledger.entries() == []


def test_decoding_allocates_nothing_outside_the_plan(model, monkeypatch):
    be = OpenCLBackend(device=DEVICE)
    factory = PairFactory(be, device_memory_bytes=1 << 34)
    plan, pair = _load(factory, model, "p")
    try:
        ctx = pair.target.context
        want = sorted(plan.specs(), key=repr)
        assert sorted(be.ledger.entries("p"), key=repr) == want
        before = be.ledger.snapshot()
        made = _count_buffers(monkeypatch)
        for b in _batches(ctx, 1):
            logits = ctx.decode(b)
            if len(b.outputs):
                ids = np.argmax(be.to_host(ctx.logits, len(b.outputs)), axis=1)  # the logits buffer, read back
                assert ids.tolist() == np.argmax(logits, axis=1).tolist()
        be.finish()
        assert made == [], f"{len(made)} cl.Buffer(s) created while decoding"
        assert be.ledger.snapshot() == before
        assert sorted(be.ledger.entries("p"), key=repr) == want
    finally:
        pair.release()
    assert be.ledger.entries() == []


def test_ops_outside_a_forward_pass_refuse_to_stage(model):
    be = OpenCLBackend(device=DEVICE)
    factory = PairFactory(be, device_memory_bytes=1 << 34)
    _, pair = _load(factory, model, "p")
    try:
        ctx = pair.target.context
        with pytest.raises(RuntimeError, match="forward"):
            be.embed(ctx.w.t["token_embd.weight"], np.array([1, 2], np.int32), ctx.s["x"][:2])
        with be.forward(ctx.s):  # a staged array larger than the planned one is a bug
            with pytest.raises(AssertionError):
                be.embed(ctx.w.t["token_embd.weight"], np.zeros(ctx.s["p_ids"].size + 1, np.int32), ctx.s["x"][:1])
    finally:
        pair.release()


def test_two_contexts_alternating_equal_each_alone(model, monkeypatch):
    be = OpenCLBackend(device=DEVICE)
    factory = PairFactory(be, device_memory_bytes=1 << 34)

    def alone(name, seed):
        _, pair = _load(factory, model, name)
        try:
            ctx = pair.target.context
            return [ctx.decode(b) for b in _batches(ctx, seed)]
        finally:
            pair.release()

    ref_a, ref_b = alone("a", 11), alone("b", 12)
    plan_a, pa = _load(factory, model, "a")
    plan_b, pb = _load(factory, model, "b")
    try:
        before = be.ledger.snapshot()
        made = _count_buffers(monkeypatch)
        ca, cb = pa.target.context, pb.target.context
        got_a, got_b = [], []
        for x, y in zip(_batches(ca, 11), _batches(cb, 12)):
            got_a.append(ca.decode(x))
            got_b.append(cb.decode(y))
            if len(x.outputs):  # the other context's logits buffer still holds its own pass's
                assert np.argmax(be.to_host(ca.logits, len(x.outputs)), axis=1).tolist() == \
                    np.argmax(got_a[-1], axis=1).tolist()
        assert made == [] and be.ledger.snapshot() == before
        for i, (g, r) in enumerate(zip(got_a, ref_a)):
            assert np.array_equal(g, r), f"context a, batch {i}"
        for i, (g, r) in enumerate(zip(got_b, ref_b)):
            assert np.array_equal(g, r), f"context b, batch {i}"
        assert sorted(be.ledger.entries("a"), key=repr) == sorted(plan_a.specs(), key=repr)
        assert sorted(be.ledger.entries("b"), key=repr) == sorted(plan_b.specs(), key=repr)
    finally:
        pa.release()
        pb.release()
    assert be.ledger.entries() == []
