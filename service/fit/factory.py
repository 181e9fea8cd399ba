"""The one context-pair factory: Fit plans a pair, Load = the same Fit, then exactly its plan is allocated.

    fit(request)  -> FitResult(fits, plan, adjustments, deficit)     (no allocation)
    load(request) -> ContextPair                                      (fit, then materialise the plan)

There is no second path: `load` calls `fit` and allocates `fit(...).plan.buffers`, so what
Fit reports is by construction what Load takes. A Load that fails at any point releases
every buffer it allocated (draft model and draft context included) before the error leaves.

Loads may run at the same time (a slow one never holds up another): each Load fits and
reserves its plan's device bytes in one short critical section, and every later fit counts
the reserved bytes not yet allocated as taken, so two Loads can never both spend the same memory.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass, field, replace

from compute.backend import Allocation, Backend, Owner, release_all
from compute.gguf_model import ModelFile, ModelFileError, open_model
from compute.llama import LlamaContext, LlamaWeights
from service.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from service.config.settings import PairRequest
from service.fit.params import ContextParams, PairParams, derive_pair_params, fill_defaults
from service.fit.plan import Plan, PlannedBuffer, plan_pair

log = logging.getLogger("specserve.factory")

MARGIN_FRACTION = 0.02  # Fit keeps this share of the budget free (allocator slack, driver overhead)


@dataclass(frozen=True)
class FitResult:
    """Whether the pair fits, the (adjusted) plan, what was adjusted, and the deficit when it does not fit."""

    fits: bool
    plan: Plan
    adjustments: tuple[str, ...]
    available_bytes: int
    deficit_bytes: int = 0
    max_n_ctx: int = 0  # largest n_ctx that fits (0: none, the weights alone do not fit)

    def error(self) -> ResourceExhausted:
        fit_ctx = f"the largest n_ctx that fits is {self.max_n_ctx}" if self.max_n_ctx else \
            "no n_ctx fits: the weights alone exceed the budget"
        return ResourceExhausted(
            f"pair does not fit: needs {self.plan.device_bytes()} device bytes, {self.available_bytes} "
            f"available; deficit {self.deficit_bytes} bytes; {fit_ctx}", self.deficit_bytes)


HOST_KINDS = ("ngram_cache",)  # planned buffers the engine reads on the host: numpy arrays on every backend


@dataclass
class ContextModel:
    """A model loaded on a backend with its context: weights + KV cache + outputs + scratch, and its
    part of the pair's caches by kind ("prompt_cache": the store; "ngram_cache": the n-gram index)."""

    file: ModelFile
    context: LlamaContext
    caches: dict[str, Allocation] = field(default_factory=dict)


class PairFactory:
    """Builds context pairs on one backend, within one memory budget, from files inside `models_dir`."""

    def __init__(self, backend: Backend, models_dir: str | None = None, device_memory_bytes: int = 0):
        self.backend = backend
        self.models_dir = os.path.realpath(models_dir) if models_dir else None
        self.budget_base = device_memory_bytes or backend.device_memory().free_bytes
        self.draft_init_hook = None  # tests: callable() raising to simulate a failing draft init
        self._reserve_lock = threading.Lock()  # fit + reserve of one Load at a time (short: no file I/O)
        self._reservations: list[_Reservation] = []  # Loads between their fit and their last allocation

    # ---- files ----
    def resolve_path(self, path: str, what: str) -> str:
        """An existing regular file inside models_dir; refuses anything else without opening it."""
        if not path:
            raise InvalidArgument(f"{what} path is empty")
        if "\0" in path:
            raise InvalidArgument(f"{what} path {path!r} contains a NUL byte")
        full = path if os.path.isabs(path) or not self.models_dir else os.path.join(self.models_dir, path)
        real = os.path.realpath(full)
        if self.models_dir and os.path.commonpath([real, self.models_dir]) != self.models_dir:
            raise PermissionDenied(f"{what} {path!r} is outside the models directory")
        shown = self.display_path(real, path)
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise NotFound(f"{what} {shown!r} does not exist") from None
        except OSError as e:  # a name too long, a loop of links, no permission on a directory
            raise InvalidArgument(f"{what} {shown!r} cannot be read ({e.strerror})") from None
        if not stat.S_ISREG(mode):
            raise InvalidArgument(f"{what} {shown!r} is not a regular file")
        return real

    def display_path(self, real: str, given: str = "") -> str:
        """How messages name a file: relative to the models directory (never the server's absolute path)."""
        if self.models_dir and os.path.commonpath([real, self.models_dir]) == self.models_dir:
            return os.path.relpath(real, self.models_dir)
        return given or os.path.basename(real)

    def open(self, path: str, what: str) -> ModelFile:
        real = self.resolve_path(path, what)
        try:
            return open_model(real)
        except ModelFileError as e:
            raise InvalidArgument(f"{what} {self.display_path(real, path)}: {e}") from e

    def _models(self, req: PairRequest) -> tuple[ModelFile, ModelFile | None]:
        target = self.open(req.target_path, "target model")
        draft = self.open(req.draft_path, "draft model") if req.draft_path else None
        if draft is not None:
            check_same_vocab(target, draft)
        return target, draft

    # ---- fit ----
    def available_bytes(self, req: PairRequest) -> int:
        """Budget minus the safety margin minus what pairs hold on the device and Loads under way reserved."""
        base = min(req.budget_bytes, self.budget_base) if req.budget_bytes else self.budget_base  # operator wins
        reserved = sum(r.outstanding() for r in list(self._reservations))
        return int(base * (1 - MARGIN_FRACTION)) - self.backend.ledger.total_bytes("device") - reserved

    def fit(self, req: PairRequest) -> FitResult:
        """Plan the pair and adjust n_ctx, then layer placement, until it fits; no allocation."""
        return self._fit(req, *self._models(req))

    def _fit(self, req: PairRequest, target: ModelFile, draft: ModelFile | None) -> FitResult:
        base = fill_defaults(req.params, target.hparams.n_ctx_train)
        avail = self.available_bytes(req)

        def plan_for(cp: ContextParams) -> Plan:
            return plan_pair(target, draft, derive_pair_params(cp, req.speculative, draft is not None),
                             self.backend, avail)

        plan = plan_for(base)
        if plan.device_bytes() <= avail:
            return FitResult(True, plan, (), avail)
        adjustments = []
        floor = max(base.n_ctx_min, base.n_parallel)
        best = _largest_fitting_ctx(plan_for, base, lo=floor, avail=avail)
        if best:
            adjustments.append(f"n_ctx reduced from {base.n_ctx} to {best} to fit {avail} available device bytes")
            return FitResult(True, plan_for(replace(base, n_ctx=best)), tuple(adjustments), avail)
        floor_cp = replace(base, n_ctx=floor - floor % base.n_parallel)
        if self.backend.device_memory().has_host:
            n_layer = target.hparams.n_layer
            for ngl in range(n_layer - 1, -1, -1):
                cand = replace(floor_cp, n_gpu_layers=ngl)
                p = plan_for(cand)
                if p.device_bytes() <= avail:
                    adjustments.append(f"n_ctx reduced from {base.n_ctx} to {cand.n_ctx} (the floor)")
                    adjustments.append(f"{n_layer - ngl} of {n_layer} layers moved to host memory")
                    return FitResult(True, p, tuple(adjustments), avail)
        at_floor = plan_for(floor_cp)
        max_ctx = _largest_fitting_ctx(plan_for, base, lo=base.n_parallel, avail=avail)
        return FitResult(False, plan, (), avail, at_floor.device_bytes() - avail, max_ctx)

    # ---- load ----
    def load(self, req: PairRequest) -> "LoadedPair":
        """Fit, then allocate exactly the plan and fill the weights; all or nothing."""
        target_file, draft_file = self._models(req)  # file I/O outside the lock
        allocs: list[Allocation] = []
        with self._reserve_lock:
            result = self._fit(req, target_file, draft_file)
            if not result.fits:
                raise result.error()
            reservation = _Reservation(result.plan.device_bytes(), allocs)
            self._reservations.append(reservation)
        plan = result.plan
        try:
            target = self._build(req.name, "target", target_file, plan, plan.params.target, allocs)
            draft = None
            if draft_file is not None:
                draft = self._build(req.name, "draft", draft_file, plan, plan.params.draft, allocs)
                if self.draft_init_hook is not None:
                    self.draft_init_hook()
        except BaseException:
            release_all(self.backend, allocs)
            raise
        finally:
            self._reservations.remove(reservation)  # allocated or released: the ledger tells from now on
        log.info("loaded pair %s: %d buffers, %d bytes", req.name, len(allocs), plan.total_bytes)
        return LoadedPair(req, result, target, draft, allocs, self.backend)

    def _build(self, pair: str, owner: Owner, mf: ModelFile, plan: Plan, cp: ContextParams,
               allocs: list[Allocation]) -> ContextModel:
        """Allocate one context's planned buffers in plan order and wrap them in a LlamaContext."""
        handles, ctx_bufs, caches = {}, {}, {}
        for pb in (b for b in plan.buffers if b.spec.owner == owner):
            alloc = self.backend.allocate_host if pb.spec.kind in HOST_KINDS else self.backend.allocate
            a = alloc(pair, pb.spec, pb.layout_dict())
            allocs.append(a)
            if pb.spec.kind == "weights":
                t = mf.tensors[pb.spec.tag]
                handles[t.name] = self.backend.load_weight(a, t.ggml_type, t.shape, mf.raw(t.name))
            elif pb.spec.kind in ("prompt_cache", "ngram_cache"):
                caches[pb.spec.kind] = a
            else:
                ctx_bufs[pb.spec.tag] = a
        ctx = LlamaContext(self.backend, LlamaWeights(mf.hparams, handles), ctx_bufs["k"], ctx_bufs["v"],
                           ctx_bufs["logits"], ctx_bufs["scratch"], n_slots=cp.n_parallel,
                           n_ctx_slot=cp.n_ctx_slot, n_batch=cp.n_batch, n_outputs_max=cp.n_outputs_max)
        return ContextModel(mf, ctx, caches)


@dataclass
class _Reservation:
    """The device bytes a Load under way planned; `allocs` fills as it allocates (then the ledger counts them)."""

    device_bytes: int
    allocs: list[Allocation]

    def outstanding(self) -> int:
        allocated = sum(a.spec.nbytes for a in list(self.allocs) if a.spec.device == "device")
        return max(self.device_bytes - allocated, 0)


def _largest_fitting_ctx(plan_for, base: ContextParams, lo: int, avail: int) -> int:
    """Largest n_ctx in [lo, base.n_ctx], a multiple of n_parallel, whose plan fits; 0 if none."""
    step = base.n_parallel
    lo_k, hi_k = -(-lo // step), base.n_ctx // step  # n_ctx = k * step
    if lo_k > hi_k or plan_for(replace(base, n_ctx=lo_k * step)).device_bytes() > avail:
        return 0
    while lo_k < hi_k:  # invariant: lo_k fits
        mid = (lo_k + hi_k + 1) // 2
        if plan_for(replace(base, n_ctx=mid * step)).device_bytes() <= avail:
            lo_k = mid
        else:
            hi_k = mid - 1
    return lo_k * step


def check_same_vocab(target: ModelFile, draft: ModelFile) -> None:
    """A draft must share the target's vocabulary: same size and the same token texts."""
    ht, hd = target.hparams, draft.hparams
    if ht.n_vocab != hd.n_vocab:
        raise InvalidArgument(f"draft vocabulary has {hd.n_vocab} tokens, the target's {ht.n_vocab}")
    tt, td = target.reader.fields.get("tokenizer.ggml.tokens"), draft.reader.fields.get("tokenizer.ggml.tokens")
    if tt is None or td is None:
        return
    if token_texts(target) != token_texts(draft):
        raise InvalidArgument("draft vocabulary differs from the target's (same size, different token texts)")


def token_texts(mf: ModelFile) -> tuple[str, ...]:
    """The token texts of a model file (cached on the ModelFile)."""
    cached = getattr(mf, "_token_texts", None)
    if cached is None:
        f = mf.reader.fields["tokenizer.ggml.tokens"]
        cached = tuple(bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data)
        mf._token_texts = cached
    return cached


class LoadedPair:
    """The buffers and contexts of a loaded pair; `release()` frees all of them exactly once."""

    def __init__(self, req: PairRequest, fit: FitResult, target: ContextModel, draft: ContextModel | None,
                 allocs: list[Allocation], backend: Backend):
        self.request, self.fit, self.plan = req, fit, fit.plan
        self.target, self.draft = target, draft
        self._allocs, self._backend = allocs, backend

    @property
    def params(self) -> PairParams:
        return self.plan.params

    @property
    def backend(self) -> Backend:
        """The backend the pair's buffers live on and its passes run on."""
        return self._backend

    def allocated(self):
        return [a.spec for a in self._allocs]

    def release(self) -> None:
        allocs, self._allocs = self._allocs, []
        release_all(self._backend, allocs)
        self.target = self.draft = None


__all__ = ["PairFactory", "PairRequest", "FitResult", "LoadedPair", "ContextModel", "FailedPrecondition",
           "PlannedBuffer"]
