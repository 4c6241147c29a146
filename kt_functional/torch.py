"""The torch adapter: the expert layer as torch.library custom ops with autograd, and KTExperts.

`torch.ops.kt_functional.moe_forward` / `moe_backward` wrap the functional API. Their fake
(meta) implementations let torch.compile trace models that use them; `register_autograd` makes
the backward op the forward's gradient formula.

A forward's residuals (the MoECache) travel to the backward inside an int64[1] "residuals"
tensor whose storage owns the cache. Autograd, non-reentrant activation checkpointing and
torch.compile all decide the lifetime of saved *tensors*, so the cache lives exactly as long as
they keep that tensor: checkpointing drops it after the forward and the recomputation makes a new
one, so the expert cache is never held twice. The backward finds the cache by the tensor's
address. The tensor's value is a key made of the call's layer, alpha and input shapes (equal in an
eager and a compiled run of the same call, as opcheck requires); a copy of the tensor (opcheck,
a copying saved-tensor hook) finds its cache by that key while the original lives and no other
forward of the same key is pending.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ._convert import check_alpha
from .ops import (MoECache, moe_backward, moe_down_backward, moe_down_forward, moe_forward, moe_gate_up_backward,
                  moe_gate_up_forward)
from .state import (_LORA_NAMES, MAX_LORA_RANK, ExpertWeights, LoRA, MoEState, check_lora_options,
                    resolve_threads)

_NAMESPACE = "kt_functional"

# layer id -> MoEState without LoRA (weights, threads, isa); the KTExperts owning it keeps it alive.
_LAYERS: "weakref.WeakValueDictionary[int, MoEState]" = weakref.WeakValueDictionary()
_LAYER_IDS = itertools.count(1)
# key -> weak references to the live _Residuals arrays with that key; each array is owned by the
# storage of the tensor that wraps it.
_RESIDUALS: dict[int, list[weakref.ref]] = {}
_LOCK = threading.RLock()  # re-entrant: a holder may die (and _forget run) while the lock is held


class _Residuals(np.ndarray):
    """int64[1] = [key]; its attributes own one forward's state and MoECache."""


def register_layer(state: MoEState) -> int:
    """Makes a LoRA-less MoEState callable from the ops; returns its layer id (the state stays owned by the caller)."""
    if not isinstance(state, MoEState) or state.lora is not None:
        raise TypeError("state: expected a MoEState without LoRA (the ops take the LoRA tensors as inputs)")
    with _LOCK:
        layer = next(_LAYER_IDS)
        _LAYERS[layer] = state
    return layer


def _layer(layer: int) -> MoEState:
    state = _LAYERS.get(layer)
    if state is None:
        raise ValueError(f"layer: no live kt_functional layer with id {layer} (its KTExperts was freed?)")
    return state


def _state_with(layer: int, lora: list[torch.Tensor], alpha: float) -> MoEState:
    base = _layer(layer)
    if not lora:
        return base
    if len(lora) != len(_LORA_NAMES):
        raise ValueError(f"lora: expected the six LoRA tensors {_LORA_NAMES} or none, got {len(lora)}")
    return replace(base, lora=LoRA(*lora, alpha=alpha))


def _residuals_key(layer: int, alpha: float, inputs: list[torch.Tensor]) -> int:
    parts = (layer, alpha, *((tuple(t.shape), t.dtype) for t in inputs))
    return (hash(parts) & 0x7FFF_FFFF_FFFF_FFFF) or 1  # 0 means "nothing saved"


def _forget(key: int, ref: weakref.ref) -> None:
    with _LOCK:
        refs = _RESIDUALS.get(key, [])
        if ref in refs:
            refs.remove(ref)
        if not refs:
            _RESIDUALS.pop(key, None)


def _residuals_tensor(key: int, state: MoEState, cache: MoECache | None) -> torch.Tensor:
    if cache is None:
        return torch.zeros(1, dtype=torch.int64)
    holder = np.array([key], dtype=np.int64).view(_Residuals)
    holder.state, holder.cache = state, cache
    with _LOCK:
        _RESIDUALS.setdefault(key, []).append(weakref.ref(holder, lambda ref: _forget(key, ref)))
    return torch.from_numpy(holder)


def _find_residuals(residuals: torch.Tensor) -> "_Residuals":
    key = int(residuals[0])
    if key == 0:
        raise RuntimeError("residuals: this forward ran without saving residuals (no input required grad)")
    with _LOCK:
        holders = [ref() for ref in _RESIDUALS.get(key, [])]
    pending = [h for h in holders if h is not None and not h.cache.consumed]
    for holder in pending:
        if holder.ctypes.data == residuals.data_ptr():
            return holder
    if len(pending) == 1:  # a copy of the residuals tensor
        return pending[0]
    if pending:
        raise RuntimeError(
            "residuals: a copy of a residuals tensor matches several pending forwards of this layer; "
            "saved-tensor hooks that copy tensors are not supported with several forwards in flight"
        )
    raise RuntimeError(
        "kt_functional: the residuals of this expert-layer forward were already used by a backward, or freed "
        "(a second backward through the same graph needs a new forward)"
    )


def live_residuals() -> tuple[int, int]:
    """(count, bytes) of forward residuals held right now by tensors of the torch adapter."""
    with _LOCK:
        holders = [ref() for refs in _RESIDUALS.values() for ref in refs]
    live = [h.cache for h in holders if h is not None and not h.cache.consumed]
    return len(live), sum(c.nbytes for c in live)


@torch.library.custom_op(f"{_NAMESPACE}::moe_forward", mutates_args=())
def _moe_forward_op(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, lora: list[torch.Tensor],
                    layer: int, alpha: float, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    state = _state_with(layer, lora, alpha)
    key = _residuals_key(layer, alpha, [x, ids, w, *lora]) if save else 0
    y, cache = moe_forward(state, x, ids, w, save_for_backward=save)
    return y, _residuals_tensor(key, state, cache)


@_moe_forward_op.register_fake
def _(x, ids, w, lora, layer, alpha, save):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((1,), dtype=torch.int64,
                                                                                   device="cpu")


@torch.library.custom_op(f"{_NAMESPACE}::moe_backward", mutates_args=())
def _moe_backward_op(residuals: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     lora: list[torch.Tensor]) -> list[torch.Tensor]:
    holder = _find_residuals(residuals)
    grads = moe_backward(holder.state, holder.cache, gy)
    out = [grads.x.to(x.dtype), grads.w.to(w.dtype)]
    if lora:
        out += [getattr(grads.lora, name).to(t.dtype) for name, t in zip(_LORA_NAMES, lora)]
    return out


@_moe_backward_op.register_fake
def _(residuals, gy, x, w, lora):
    return [torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(w, memory_format=torch.contiguous_format)] + [
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in lora]


def _setup_context(ctx, inputs, output):
    x, ids, w, lora, layer, alpha, save = inputs
    ctx.save_for_backward(output[1], x, w, *lora)
    ctx.num_lora = len(lora)


def _backward(ctx, gy, _g_residuals):
    residuals, x, w, *lora = ctx.saved_tensors
    dx, dw, *dlora = torch.ops.kt_functional.moe_backward(residuals, gy, x, w, lora)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, None, dw if needs[2] else None,
            dlora if ctx.num_lora else [], None, None, None)


_moe_forward_op.register_autograd(_backward, setup_context=_setup_context)


_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def _kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """fp16 / fp64 tensors as fp32 (exact for fp16): a differentiable cast, so their gradients come back in
    their own dtype; the kernels take bf16 or fp32."""
    return t if t.dtype in _KERNEL_DTYPES or not t.is_floating_point() else t.float()


def moe_experts(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, layer: int,
                lora: list[torch.Tensor] | tuple = (), alpha: float = 32.0) -> torch.Tensor:
    """y = the expert layer registered as layer, differentiable in x, w and the LoRA tensors.

    y has x's dtype; fp16 (or fp64) x, w and LoRA are computed as fp32 ones (bf16 activations, fp32 LoRA math).
    """
    out_dtype = x.dtype
    x, w = _kernel_dtype(x), _kernel_dtype(w)
    lora = [_kernel_dtype(t) for t in lora]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in [x, w, *lora])
    y, _ = torch.ops.kt_functional.moe_forward(x, ids, w, lora, layer, check_alpha(alpha, None), save)
    return y if y.dtype == out_dtype else y.to(out_dtype)


class _GateUpPart(torch.autograd.Function):
    """The split path's first kernel call: g | u per slot [T, k, 2I] (fp32), differentiable in x and the gate
    and up LoRA."""

    @staticmethod
    def forward(ctx, x, ids, w, layer, alpha, save, *lora):
        state = _state_with(layer, list(lora), alpha)
        gate_up, cache = moe_gate_up_forward(state, x, ids, w, save_for_backward=save)
        ctx.state, ctx.cache, ctx.x_dtype = state, cache, x.dtype
        ctx.lora_dtypes = [t.dtype for t in lora]
        return gate_up

    @staticmethod
    def backward(ctx, dgate_up):
        grads = moe_gate_up_backward(ctx.state, ctx.cache, dgate_up)
        lora = [getattr(grads.lora, n).to(d) if n[:2] in ("ga", "up") else None
                for n, d in zip(_LORA_NAMES, ctx.lora_dtypes)] if ctx.lora_dtypes else []
        return (grads.x.to(ctx.x_dtype), None, None, None, None, None, *lora)


class _DownPart(torch.autograd.Function):
    """The split path's second kernel call: y [T, H] from h per slot [T, k, I], differentiable in h, w and the
    down LoRA."""

    @staticmethod
    def forward(ctx, h, ids, w, layer, alpha, save, *lora):
        state = _state_with(layer, list(lora), alpha)
        y, cache = moe_down_forward(state, h, ids, w, save_for_backward=save)
        ctx.state, ctx.cache, ctx.h_dtype, ctx.w_dtype = state, cache, h.dtype, w.dtype
        ctx.lora_dtypes = [t.dtype for t in lora]
        return y

    @staticmethod
    def backward(ctx, gy):
        grads = moe_down_backward(ctx.state, ctx.cache, gy)
        lora = [getattr(grads.lora, n).to(d) if n.startswith("down") else None
                for n, d in zip(_LORA_NAMES, ctx.lora_dtypes)] if ctx.lora_dtypes else []
        return (grads.x.to(ctx.h_dtype), None, grads.w.to(ctx.w_dtype), None, None, None, *lora)


def split_experts(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, layer: int, gate_fn,
                  lora: list[torch.Tensor] | tuple = (), alpha: float = 32.0) -> torch.Tensor:
    """The expert layer with a gate function computed in torch: the kernels compute g, u (LoRA and biases
    included) per routed slot, h = gate_fn(g, u) ([T, k, I] each, under autograd), the kernels compute down.
    y has x's dtype."""
    out_dtype = x.dtype
    x, w = _kernel_dtype(x), _kernel_dtype(w)
    lora = [_kernel_dtype(t) for t in lora]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in [x, w, *lora])
    gate_up = _GateUpPart.apply(x, ids, w, layer, float(alpha), save, *lora)
    I = gate_up.shape[-1] // 2
    h = gate_fn(gate_up[..., :I], gate_up[..., I:])
    save = torch.is_grad_enabled() and any(t.requires_grad for t in [h, w, *lora])
    y = _DownPart.apply(h.float(), ids, w, layer, float(alpha), save, *lora)
    return y if y.dtype == out_dtype else y.to(out_dtype)


class KTExperts(nn.Module):
    """The routed experts of one MoE layer: packed frozen weights on the CPU plus trainable LoRA.

    The six LoRA tensors are nn.Parameters in PEFT's shapes (one A [r, in] and B [out, r] per
    expert): gate_a, up_a [E, r, H]; gate_b, up_b [E, I, r]; down_a [E, r, I]; down_b [E, H, r].
    The kernels read them at every call, so any optimizer's in-place step is used by the next
    forward. forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H] is
    transformers v5's experts signature; hidden_states may live on any device.
    """

    def __init__(self, weights: ExpertWeights, lora_rank: int | None = 16, lora_alpha: float = 32.0,
                 threads: int | None = None, *, isa: str | None = None, lora_dtype: torch.dtype = torch.float32,
                 seed: int = 0):
        super().__init__()
        if not isinstance(weights, ExpertWeights):
            raise TypeError(f"weights: expected ExpertWeights, got {type(weights).__name__}")
        lora_rank, lora_alpha = check_lora_options(lora_rank, lora_alpha)
        self._state = MoEState(weights, None, threads=resolve_threads(threads), isa=isa)
        self._layer = register_layer(self._state)
        self.lora_alpha = lora_alpha
        if lora_rank is None:
            self.lora_rank = 0
            return
        lora = LoRA.init(weights, rank=lora_rank, alpha=lora_alpha, seed=seed, dtype=lora_dtype)
        self.set_lora(lora.tensors(), lora_alpha)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # A deep copy or an unpickled module holds a new MoEState: register it under its own layer id.
        self._layer = register_layer(self._state)

    def set_weights(self, weights: ExpertWeights) -> None:
        """Replaces the packed base weights by weights of the same (E, H, I); the LoRA stays."""
        if not isinstance(weights, ExpertWeights):
            raise TypeError(f"weights: expected ExpertWeights, got {type(weights).__name__}")
        dims = (weights.num_experts, weights.hidden_size, weights.intermediate_size)
        if dims != (self.num_experts, self.hidden_size, self.intermediate_size):
            raise ValueError(f"weights: expected (E, H, I) = {(self.num_experts, self.hidden_size, self.intermediate_size)}"
                             f", got {dims}")
        self._state = replace(self._state, weights=weights)
        self._layer = register_layer(self._state)

    def set_lora(self, tensors: dict[str, torch.Tensor], alpha: float) -> None:
        """Replaces the LoRA parameters (any rank in 1..128) by copies of tensors (bf16, fp32, or fp16: computed
        in fp32); validates them first."""
        LoRA(**{name: _kernel_dtype(tensors[name].detach()) for name in _LORA_NAMES}, alpha=alpha)  # shape/dtype checks
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        if tuple(tensors["gate_a"].shape[::2]) != (E, H) or tensors["gate_b"].shape[1] != I:
            raise ValueError(f"tensors: LoRA for (E, H, I) = {(E, H, I)} expected, got gate_a "
                             f"{list(tensors['gate_a'].shape)}, gate_b {list(tensors['gate_b'].shape)}")
        for name in _LORA_NAMES:
            setattr(self, name, nn.Parameter(tensors[name].detach().clone().contiguous()))
        self.lora_rank = self.gate_a.shape[1]
        self.lora_alpha = float(alpha)

    @property
    def weights(self) -> ExpertWeights:
        return self._state.weights

    @property
    def num_experts(self) -> int:
        return self._state.weights.num_experts

    @property
    def hidden_size(self) -> int:
        return self._state.weights.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self._state.weights.intermediate_size

    def lora_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in _LORA_NAMES] if self.lora_rank else []

    # A gate function computed in torch (the split path: split_experts) instead of the kernels' epilogue:
    # gate_fn(g, u) -> h, [T, k, I] each; None runs the whole layer in the kernels.
    gate_fn = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.gate_fn is not None:
            return split_experts(hidden_states, top_k_index, top_k_weights, self._layer, self.gate_fn,
                                 self.lora_tensors(), self.lora_alpha)
        return moe_experts(hidden_states, top_k_index, top_k_weights, self._layer, self.lora_tensors(),
                           self.lora_alpha)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, lora_rank={self.lora_rank}, "
                f"lora_alpha={self.lora_alpha}, threads={self._state.threads}, isa={self._state.isa!r}, "
                f"gate={'kernels' if self.gate_fn is None else self.gate_fn!r}, "
                f"packed={self.weights.nbytes / 2**20:.1f} MiB")


__all__ = ["KTExperts", "moe_experts", "split_experts", "register_layer", "live_residuals", "MAX_LORA_RANK"]
