"""The functional API: moe_forward(state, x, ids, w) -> (y, cache); moe_backward(state, cache, gy) -> grads.

Functions never mutate their inputs. A cache is a handle to one forward's residuals, sized by
that call's T: it is consumed by exactly one moe_backward, many can be alive at once, and its
memory is freed when it is consumed or garbage-collected.

Outputs take the kind of x, decided at forward time: numpy x (float32) gives numpy float32 arrays
for y and every gradient; a torch x gives y and grads.x in x's dtype and grads.w in w's dtype,
on x's device, and the LoRA gradients as fp32 CPU tensors.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import _core
from ._convert import (DTYPE_CODE, FLOAT_DTYPES, INDEX_DTYPES, as_tensor, check_dtype, check_shape,
                       cpu_contiguous, to_kind)
from .state import _LORA_NAMES, PARTITION_AXIS, MoEState

MAX_TOP_K = 64


@dataclass(frozen=True)
class LoRAGrads:
    """fp32 gradients of the six LoRA tensors, in their shapes."""

    gate_a: object
    gate_b: object
    up_a: object
    up_b: object
    down_a: object
    down_b: object


@dataclass(frozen=True)
class Grads:
    """x: dL/dx [T, H]; w: dL/dw [T, k]; lora: LoRAGrads, or None for a state without LoRA."""

    x: object
    w: object
    lora: LoRAGrads | None


class MoECache:
    """Handle to the residuals of one forward call (see the module docstring). Single use: it cannot
    be copied or pickled."""

    __slots__ = ("_cores", "_state_token", "_meta", "_lora_key", "_lora_anchor", "__weakref__")

    def __init__(self, core: tuple, state: MoEState, meta: dict, lora_stamp):
        self._cores = core  # _core.ForwardCache per partition of the state: the backward takes them out, once
        self._state_token = state._token
        self._meta = meta
        self._lora_key, self._lora_anchor = lora_stamp or (None, None)

    @property
    def _core(self):
        """The first partition's residuals: all of them for an unpartitioned state."""
        return self._cores[0]

    @property
    def consumed(self) -> bool:
        return self._core.consumed  # the backward takes them all

    @property
    def nbytes(self) -> int:
        """Bytes held by the residuals (0 once consumed)."""
        return sum(c.nbytes for c in self._cores)

    @property
    def num_tokens(self) -> int:
        return self._meta["T"]

    def __reduce_ex__(self, protocol):  # copy.copy, copy.deepcopy and pickle all come here
        raise TypeError("MoECache: a forward's cache is single-use and cannot be copied or pickled; "
                        "pass the cache itself to moe_backward")

    def __repr__(self):
        state = "consumed" if self.consumed else f"{self.nbytes} bytes"
        return f"MoECache(T={self.num_tokens}, {state})"


def _workspace_f32(shape) -> torch.Tensor:
    """An uninitialised fp32 output in the kernels' workspace memory: freed, it goes back to their cache, so
    the next call's outputs fault no fresh pages (torch.empty's large arrays are fresh pages, a page fault
    each 4 KiB: ~13,000 and ~10 ms for a T=16 backward's 67 MB of LoRA gradients at the bench layer)."""
    return torch.from_dlpack(_core.workspace_f32(tuple(shape)))


def _check_state(state) -> MoEState:
    if not isinstance(state, MoEState):
        raise TypeError(f"state: expected MoEState, got {type(state).__name__}")
    return state


def routing_inputs(x, ids, w, H: int | None):
    """Checks x [T, H], ids [T, k] and w [T, k] (H None: any, where this process holds no experts);
    returns (x, x_is_numpy, ids, w) as tensors."""
    x, x_np = as_tensor(x, "x")
    ids, _ = as_tensor(ids, "ids")
    w, _ = as_tensor(w, "w")
    check_dtype(x, "x", FLOAT_DTYPES)
    if H is None and x.dim() != 2:
        raise ValueError(f"x: expected shape [T, H], got {list(x.shape)}")
    if H is not None:
        check_shape(x, "x", (None, H), f"[T, H] with H = {H}")
    T = x.shape[0]
    check_dtype(ids, "ids", INDEX_DTYPES)
    if ids.dim() != 2 or ids.shape[0] != T:
        raise ValueError(f"ids: expected shape [T, k] with T = {T} (from x), got {list(ids.shape)}")
    k = ids.shape[1]
    if not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"ids: expected 1 <= k <= {MAX_TOP_K} experts per token, got k = {k}")
    check_dtype(w, "w", FLOAT_DTYPES)
    check_shape(w, "w", (T, k), f"[T, k] = {[T, k]} like ids")
    return x, x_np, ids, w


def _forward_inputs(state: MoEState, x, ids, w):
    """Validates the forward's inputs; returns them as contiguous CPU tensors plus metadata."""
    H, E = state.weights.hidden_size, state.weights.num_experts
    x, x_np, ids, w = routing_inputs(x, ids, w, H)
    T, k = ids.shape
    if T:  # range check before the narrowing to int32
        lo = int(ids.min())
        if lo < -1:
            raise ValueError(f"ids: expert ids must be >= -1 (-1 = unused slot; ids >= {E} are expert-parallel "
                             f"sentinels, skipped like -1), got a minimum of {lo}")
    # The outputs' kind (module docstring): numpy has no bf16, so numpy outputs are all float32.
    meta = {"T": T, "k": k, "x_dtype": x.dtype, "w_dtype": torch.float32 if x_np else w.dtype, "numpy": x_np,
            "device": x.device}
    return (cpu_contiguous(x, torch.bfloat16), cpu_contiguous(ids, torch.int32), cpu_contiguous(w, torch.float32),
            meta)


@contextlib.contextmanager
def _waiting_on_failure(jobs: list):
    """If submitting a later partition's job fails, the jobs already running still read this call's tensors:
    wait for them before the error frees those."""
    try:
        yield
    except BaseException:
        for job in jobs:
            job.wait()
        raise


class ForwardHandle:
    """A forward running on the state's worker threads; result() waits (GIL released)."""

    def __init__(self, jobs, ys, cache: MoECache | None, keep_alive, meta):
        self._jobs = jobs  # one per partition of the state
        self._ys = ys  # their outputs: y itself, or partial results (fp32) to add up
        self._cache = cache
        self._keep_alive = keep_alive  # inputs the kernels read until the jobs are done
        self._meta = meta

    def done(self) -> bool:
        return all(job.done() for job in self._jobs)

    def __del__(self):
        # The kernels read the inputs and write y until the jobs end: never free them earlier.
        if getattr(self, "_keep_alive", None) is not None:
            for job in self._jobs:
                job.wait()

    def result(self):
        """(y, cache): y of the input's kind and dtype; cache None without save_for_backward."""
        for job in self._jobs:
            job.wait()
        self._keep_alive = None
        meta = self._meta
        y = self._ys[0]
        for partial in self._ys[1:]:  # in partition order: deterministic
            y = y + partial
        return to_kind(y.to(meta["x_dtype"]), meta["numpy"], meta["device"]), self._cache


def moe_forward_async(state: MoEState, x, ids, w, *, save_for_backward: bool = True) -> ForwardHandle:
    """Starts the forward on the library's worker threads and returns at once."""
    state = _check_state(state)
    xb, ids32, wf, meta = _forward_inputs(state, x, ids, w)
    T, k = meta["T"], meta["k"]
    calls = state.calls()
    y_dtype = meta["x_dtype"] if len(calls) == 1 else torch.float32  # partial results add up in fp32
    jobs, ys, cores, keep_alive = [], [], [], [xb, ids32, wf]
    with _waiting_on_failure(jobs):
        for part, lora_args, lora_tensors in calls:
            y = torch.empty(T, state.weights.hidden_size, dtype=y_dtype)
            job, core_cache = _core.submit_forward(
                part._pool, part.weights.packed, part.isa, xb.data_ptr(), ids32.data_ptr(), wf.data_ptr(),
                T, k, y.data_ptr(), DTYPE_CODE[y.dtype], lora_args, bool(save_for_backward),
                variant=part.weights.variant_args(),
            )
            jobs.append(job)
            ys.append(y)
            cores.append(core_cache)
            keep_alive += [lora_tensors, part.weights]  # its biases: read by the job until it ends
    cache = MoECache(tuple(cores), state, meta, state.lora_stamp()) if save_for_backward else None
    return ForwardHandle(jobs, ys, cache, keep_alive, meta)


def moe_forward(state: MoEState, x, ids, w, *, save_for_backward: bool = True):
    """y = MoE expert layer (MATH.md) of x routed by (ids, w); returns (y, cache or None).

    x [T, H] bf16/fp32, ids [T, k] int32/int64 (-1 = unused slot; ids >= E, expert-parallel sentinels, are
    skipped like -1), w [T, k] fp32/bf16;
    torch tensors (any device, any strides) or numpy arrays. y has x's dtype and kind.
    """
    return moe_forward_async(state, x, ids, w, save_for_backward=save_for_backward).result()


def moe_backward(state: MoEState, cache: MoECache, gy) -> Grads:
    """Gradients of the forward that made cache, given gy = dL/dy [T, H]; consumes the cache.

    Everything is checked and converted before the cache is consumed: on an error the cache stays usable.
    """
    state = _check_state(state)
    if not isinstance(cache, MoECache):
        raise TypeError(
            f"cache: expected the MoECache returned by moe_forward(save_for_backward=True), got {type(cache).__name__}"
        )
    if cache.consumed:
        raise ValueError(_core.CACHE_CONSUMED)
    if cache._state_token is not state._token:
        raise ValueError("cache: it was made by a different MoEState")
    lora_key, _ = state.lora_stamp() or (None, None)
    if cache._lora_key != lora_key:
        raise ValueError(
            "state.lora: a LoRA tensor was modified in place or replaced (p.data = ...) between moe_forward and "
            "moe_backward; run the backward before the optimizer step"
        )
    meta = cache._meta
    T, k, H = meta["T"], meta["k"], state.weights.hidden_size
    gy, _ = as_tensor(gy, "gy")
    check_dtype(gy, "gy", FLOAT_DTYPES)
    check_shape(gy, "gy", (T, H), f"[T, H] = {[T, H]} like the forward's y")
    gyb = cpu_contiguous(gy, torch.bfloat16)
    calls = state.calls()
    out_dtype = meta["x_dtype"] if len(calls) == 1 else torch.float32  # partial results add up in fp32
    jobs, outs = [], []
    with _waiting_on_failure(jobs):
        for (part, lora_args, lora_tensors), core in zip(calls, cache._cores):
            dx = torch.empty(T, H, dtype=out_dtype)
            dw = torch.empty(T, k, dtype=torch.float32)
            grads = [_workspace_f32(t.shape) for t in lora_tensors]  # the job writes them all
            grad_ptrs = tuple(g.data_ptr() for g in grads) if grads else (0,) * 6
            # Consumes the partition's residuals atomically (ValueError if another thread got them first);
            # the running job holds them and frees them when done.
            jobs.append(_core.submit_backward(
                part._pool, part.weights.packed, part.isa, core, gyb.data_ptr(), dx.data_ptr(),
                DTYPE_CODE[dx.dtype], dw.data_ptr(), lora_args, grad_ptrs, variant=part.weights.variant_args(),
            ))
            outs.append((dx, dw, grads, lora_tensors))  # lora_tensors: read by the job until it ends
    for job in jobs:
        job.wait()
    dx, dw, grads, _ = outs[0]
    for part_dx, part_dw, _, _ in outs[1:]:  # in partition order: deterministic
        dx, dw = dx + part_dx, dw + part_dw
    if grads and len(outs) > 1:
        grads = [_reduce_partitions([out[2][i] for out in outs], PARTITION_AXIS[name])
                 for i, name in enumerate(_LORA_NAMES)]
    # From here on only conversions the forward's output kind allows (none can fail).
    numpy, device = meta["numpy"], meta["device"]
    lora = LoRAGrads(*(to_kind(g, numpy, torch.device("cpu")) for g in grads)) if grads else None
    return Grads(
        x=to_kind(dx.to(meta["x_dtype"]), numpy, device),
        w=to_kind(dw.to(meta["w_dtype"]), numpy, device),
        lora=lora,
    )


def _reduce_partitions(grads: list[torch.Tensor], axis: int | None) -> torch.Tensor:
    """A LoRA gradient from its partitions': their sum for a tensor they share, else their slices joined."""
    if axis is not None:
        return torch.cat(grads, dim=axis)
    total = grads[0]
    for g in grads[1:]:
        total = total + g
    return total


# ---- The split path: the layer in two kernel calls around a gate function computed by the caller -------------
#
# moe_gate_up_forward gives each routed slot's pre-activations g | u (LoRA and biases included); the caller
# computes h from them (e.g. an experts module's own _apply_gate, under torch autograd); moe_down_forward
# runs down + LoRA + the weighted sum. Backwards in reverse: moe_down_backward gives dh (w applied) and dw,
# the caller's autograd turns dh into dg | du, moe_gate_up_backward gives dx. Each LoRA gradient comes from
# the part that uses it (gate / up from the gate_up part, down from the down part); the others are zero.

_PART_GATE_UP, _PART_DOWN = 1, 2


def _split_cache(cache, state, meta, part: int):
    return MoECache((cache,), state, {**meta, "part": part}, state.lora_stamp())


def _split_call(state: MoEState) -> tuple:
    """(pointers of the state's LoRA as the tensors are now, the tensors to keep alive meanwhile)."""
    calls = state.calls()
    if len(calls) != 1:
        raise ValueError(f"state: the split path runs unpartitioned states, got {len(calls)} partitions")
    return calls[0][1:]


def moe_gate_up_forward(state: MoEState, x, ids, w, *, save_for_backward: bool = True):
    """(gate_up [T, k, 2I] fp32: g in [..., :I], u in [..., I:] of each slot, zero where the slot has no
    route; cache or None) of the split path."""
    state = _check_state(state)
    xb, ids32, wf, meta = _forward_inputs(state, x, ids, w)
    T, k, I = meta["T"], meta["k"], state.weights.intermediate_size
    lora_args, lora_tensors = _split_call(state)
    out = torch.zeros(T, k, 2 * I)
    job, core = _core.submit_forward(
        state._pool, state.weights.packed, state.isa, xb.data_ptr(), ids32.data_ptr(), wf.data_ptr(), T, k, 0,
        DTYPE_CODE[torch.float32], lora_args, bool(save_for_backward), variant=state.weights.variant_args(),
        part=_PART_GATE_UP, gate_up_out=out.data_ptr())
    job.wait()
    return out, (_split_cache(core, state, meta, _PART_GATE_UP) if save_for_backward else None)


def moe_down_forward(state: MoEState, h, ids, w, *, save_for_backward: bool = True):
    """(y [T, H] in h's dtype, cache or None) of the split path, from h [T, k, I] per slot (bf16 or fp32)."""
    state = _check_state(state)
    E, H, I = state.weights.num_experts, state.weights.hidden_size, state.weights.intermediate_size
    h, _ = as_tensor(h, "h")
    check_dtype(h, "h", FLOAT_DTYPES)
    if h.dim() != 3 or h.shape[2] != I:
        raise ValueError(f"h: expected shape [T, k, I] with I = {I}, got {list(h.shape)}")
    T, k = h.shape[:2]
    _, ids32, wf, meta = _forward_inputs(state, torch.zeros(T, H, dtype=h.dtype), ids, w)
    if ids32.shape[1] != k:
        raise ValueError(f"ids: expected shape [T, k] = {[T, k]} like h, got {list(ids32.shape)}")
    hb = cpu_contiguous(h, torch.bfloat16)
    lora_args, lora_tensors = _split_call(state)
    y = torch.empty(T, H, dtype=h.dtype)
    job, core = _core.submit_forward(
        state._pool, state.weights.packed, state.isa, 0, ids32.data_ptr(), wf.data_ptr(), T, k, y.data_ptr(),
        DTYPE_CODE[y.dtype], lora_args, bool(save_for_backward), variant=state.weights.variant_args(),
        part=_PART_DOWN, h_in=hb.data_ptr())
    job.wait()
    return y, (_split_cache(core, state, {**meta, "x_dtype": h.dtype}, _PART_DOWN) if save_for_backward else None)


def _split_backward(state: MoEState, cache, part: int, gy=None, dgate_up=None):
    state = _check_state(state)
    if not isinstance(cache, MoECache) or cache._meta.get("part") != part:
        which = {_PART_GATE_UP: "moe_gate_up_forward", _PART_DOWN: "moe_down_forward"}[part]
        raise TypeError(f"cache: expected the MoECache returned by {which}(save_for_backward=True)")
    if cache.consumed:
        raise ValueError(_core.CACHE_CONSUMED)
    if cache._state_token is not state._token:
        raise ValueError("cache: it was made by a different MoEState")
    if cache._lora_key != (state.lora_stamp() or (None, None))[0]:
        raise ValueError("state.lora: a LoRA tensor was modified in place or replaced between the forward and the "
                         "backward")
    meta = cache._meta
    T, k, H, I = meta["T"], meta["k"], state.weights.hidden_size, state.weights.intermediate_size
    lora_args, lora_tensors = _split_call(state)
    grads = [torch.zeros(t.shape, dtype=torch.float32) for t in lora_tensors]
    grad_ptrs = tuple(g.data_ptr() for g in grads) if grads else (0,) * 6
    dw = torch.zeros(T, k)
    dx = torch.zeros(T, H, dtype=meta["x_dtype"])
    dh = torch.zeros(T, k, I) if part == _PART_DOWN else None
    if part == _PART_DOWN:
        gy, _ = as_tensor(gy, "gy")
        check_dtype(gy, "gy", FLOAT_DTYPES)
        check_shape(gy, "gy", (T, H), f"[T, H] = {[T, H]} like the forward's y")
        src, dgu = cpu_contiguous(gy, torch.bfloat16), 0
    else:
        dgate_up, _ = as_tensor(dgate_up, "dgate_up")
        check_dtype(dgate_up, "dgate_up", FLOAT_DTYPES)
        check_shape(dgate_up, "dgate_up", (T, k, 2 * I), f"[T, k, 2I] = {[T, k, 2 * I]} like the forward's output")
        src = cpu_contiguous(dgate_up, torch.bfloat16)
        dgu = src.data_ptr()
    job = _core.submit_backward(
        state._pool, state.weights.packed, state.isa, cache._core, src.data_ptr() if part == _PART_DOWN else 0,
        dx.data_ptr(), DTYPE_CODE[dx.dtype], dw.data_ptr(), lora_args, grad_ptrs, variant=state.weights.variant_args(),
        dh_out=0 if dh is None else dh.data_ptr(), dgu_in=dgu)
    job.wait()
    lora = LoRAGrads(*grads) if grads else None
    return Grads(x=dh if part == _PART_DOWN else dx, w=dw.to(meta["w_dtype"]) if part == _PART_DOWN else None,
                 lora=lora)


def moe_down_backward(state: MoEState, cache: MoECache, gy) -> Grads:
    """Of moe_down_forward: Grads(x=dh [T, k, I] fp32 (w applied), w=dw, lora=the down LoRA's gradients)."""
    return _split_backward(state, cache, _PART_DOWN, gy=gy)


def moe_gate_up_backward(state: MoEState, cache: MoECache, dgate_up) -> Grads:
    """Of moe_gate_up_forward, given dgate_up [T, k, 2I] (dg | du): Grads(x=dx, w=None, lora=the gate and up
    LoRA's gradients)."""
    return _split_backward(state, cache, _PART_GATE_UP, dgate_up=dgate_up)
