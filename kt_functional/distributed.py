"""Multi-process expert layers: one rank (the owner) holds the experts and their LoRA; every rank sends it its tokens.

Every rank of an ExpertGroup calls moe_forward / moe_backward for the same layers in the same order (as the
ranks of a data-parallel job do). A forward all-gathers each rank's token count and input checks; the other
ranks send their tokens (x, ids, w) to the owner point to point; the owner runs ONE forward over all of them
(in rank order) and sends every rank its rows of y. The backward sends gy and returns dx and dw the same way.
The owner's LoRA gradients therefore cover every rank's tokens, summed.

No failure leaves a rank waiting forever: invalid input on any rank is seen by every rank (the checks travel
with the token counts) and raises everywhere; an error on the owner is broadcast and raises everywhere; a
rank that dies or stops calling makes the others' exchange fail after the group's timeout, with an error
that says so.
"""
from __future__ import annotations

import datetime
import itertools
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import ops
from ._convert import FLOAT_DTYPES, as_tensor, check_dtype, check_shape, cpu_contiguous, to_kind
from .ops import Grads, MoECache, routing_inputs
from .state import _LORA_NAMES, LoRA, MoEState
from .torch import KTExperts, _kernel_dtype

LORA_GRAD_REDUCTIONS = ("sum", "mean")


class ExchangeError(RuntimeError):
    """The exchange with the other ranks failed: a rank raised, exited or stopped calling (timeout)."""


@dataclass(frozen=True, eq=False)
class ExpertGroup:
    """The ranks that share one owner's experts: a process group of their own and the owner's rank in it.

    A group of its own keeps the expert exchange from interleaving with other collectives (DDP's gradient
    all-reduce runs on the default group while the backward of the experts runs).
    """

    group: object  # torch.distributed.ProcessGroup
    owner: int
    _forwards: itertools.count = field(default_factory=itertools.count, repr=False)

    @classmethod
    def new(cls, owner_rank: int = 0, *, timeout: datetime.timedelta | None = None) -> "ExpertGroup":
        """A group of every rank of the default process group (collective: every rank calls it, in the same order).

        timeout: how long a rank waits for the others; by default the default process group's timeout.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
        world = dist.get_world_size()
        if isinstance(owner_rank, bool) or not isinstance(owner_rank, int) or not 0 <= owner_rank < world:
            raise ValueError(f"owner_rank: expected a rank in 0..{world - 1}, got {owner_rank!r}")
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError(f"timeout: expected a datetime.timedelta or None, got {type(timeout).__name__}")
        group = dist.new_group(timeout=timeout or _default_timeout(), backend=dist.get_backend())
        return cls(group, owner_rank)

    def __deepcopy__(self, memo) -> "ExpertGroup":  # a process group is shared, never copied
        return self

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def is_owner(self) -> bool:
        return self.rank == self.owner

    def run_on_owner(self, fn) -> None:
        """Runs fn() on the owner only; every rank returns once it is done, or raises if it failed (collective)."""
        error = None
        if self.is_owner:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
                error = e
        self._settle(error)

    # ---- communication (every call wraps the backend's errors into one that names this rank and the cause)

    def _device(self) -> torch.device:
        if "nccl" in str(dist.get_backend(self.group)):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _failed(self, what: str, e: Exception) -> ExchangeError:
        return ExchangeError(
            f"kt_functional.distributed: rank {self.rank} of {self.size} (owner: rank {self.owner}): {what} failed; "
            f"another rank raised, exited or stopped calling the expert layers in the same order (timeout). "
            f"Backend error: {e}")

    def _all_gather_rows(self, row: list[int], what: str) -> torch.Tensor:
        """[size, len(row)] int64 on the CPU: every rank's row."""
        dev = self._device()
        out = torch.empty(self.size * len(row), dtype=torch.int64, device=dev)
        try:
            _all_gather_single(out, torch.tensor(row, dtype=torch.int64, device=dev), group=self.group)
        except RuntimeError as e:
            raise self._failed(what, e) from e
        return out.view(self.size, len(row)).cpu()

    def _exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], what: str) -> None:
        """Point-to-point: sends[r] to rank r, recvs[r] filled from rank r (tensors on self._device())."""
        try:
            works = [dist.isend(t, group=self.group, group_dst=r) for r, t in sends.items()]
            works += [dist.irecv(t, group=self.group, group_src=r) for r, t in recvs.items()]
            for work in works:
                work.wait()
        except RuntimeError as e:
            raise self._failed(what, e) from e

    def _settle(self, error: BaseException | None) -> None:
        """The owner tells every rank whether its part succeeded; on failure every rank raises."""
        dev = self._device()
        flag = torch.tensor([int(error is not None)], dtype=torch.int64, device=dev)
        try:
            dist.broadcast(flag, group=self.group, group_src=self.owner)
            if not flag.item():
                return
            message = [f"{type(error).__name__}: {error}" if self.is_owner else None]
            dist.broadcast_object_list(message, group=self.group, group_src=self.owner, device=dev)
        except RuntimeError as e:
            raise self._failed("waiting for the owner's result", e) from e
        if self.is_owner:
            raise error
        raise RuntimeError(f"kt_functional.distributed: the owner (rank {self.owner}) failed: {message[0]}")


# torch 2.13 renamed all_gather_into_tensor (still there, deprecated)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _default_timeout() -> datetime.timedelta | None:
    """The default process group's timeout (a new group would otherwise get the backend's default, 30 min)."""
    try:
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        return backend.options._timeout
    except (AttributeError, RuntimeError):  # a backend without options: its own default
        return None


def _check_group(group) -> ExpertGroup:
    if not isinstance(group, ExpertGroup):
        raise TypeError(f"group: expected an ExpertGroup (kt_functional.distributed.ExpertGroup.new), "
                        f"got {type(group).__name__}")
    return group


def _check_state(group: ExpertGroup, state) -> None:
    if group.is_owner and not isinstance(state, MoEState):
        raise TypeError(f"state: rank {group.rank} is the owner and must pass its MoEState, got {type(state).__name__}")
    if not group.is_owner and state is not None:
        raise TypeError(f"state: rank {group.rank} is not the owner (rank {group.owner}) and holds no experts; "
                        f"pass None, got {type(state).__name__}")


def _raise_for_rank_errors(group: ExpertGroup, table: torch.Tensor, error: Exception | None) -> None:
    """Every rank raises when any rank's local checks failed: its own error there, a pointer to it elsewhere."""
    if error is not None:
        raise error
    bad = [r for r in range(group.size) if table[r, 0]]
    if bad:
        raise RuntimeError(f"kt_functional.distributed: the inputs of rank(s) {bad} to this expert layer call were "
                           f"invalid (their error says why); every rank of the expert group raised")


# One row per rank in the forward's all-gather: its check result, sizes, x dtype, save flag, ids range, and
# (the owner's row) the experts' E and H.
_ERROR, _T, _K, _H, _X_FP32, _SAVE, _IDS_LO, _IDS_HI, _E, _OWNER_H = range(10)
_ROW = 10


def _check_forward_table(group: ExpertGroup, table: torch.Tensor) -> None:
    """Checks every rank makes with the same table, so they all raise the same error or all go on."""
    rows = table.tolist()
    owner = rows[group.owner]
    ks = {r: row[_K] for r, row in enumerate(rows)}
    if len(set(ks.values())) > 1:
        raise ValueError(f"ids: every rank must route each token to the same number k of experts; k per rank: {ks}")
    hs = {r: row[_H] for r, row in enumerate(rows) if row[_H] != owner[_OWNER_H]}
    if hs:
        raise ValueError(f"x: the owner's experts have hidden size H = {owner[_OWNER_H]}; rank(s) sent H = {hs}")
    saves = {r: bool(row[_SAVE]) for r, row in enumerate(rows)}
    if len(set(saves.values())) > 1:
        raise ValueError(f"save_for_backward: every rank must agree (the backward is collective too); "
                         f"per rank: {saves}")
    E = owner[_E]
    out_of_range = {r: (row[_IDS_LO], row[_IDS_HI]) for r, row in enumerate(rows)
                    if row[_T] and (row[_IDS_LO] < -1 or row[_IDS_HI] >= E)}
    if out_of_range:
        raise ValueError(f"ids: expert ids must be in [-1, {E}) (-1 = unused slot); rank: (min, max) = {out_of_range}")


def _bytes(*tensors: torch.Tensor) -> torch.Tensor:
    """Row-wise byte view of [T, *] contiguous tensors, concatenated: [T, total bytes per row] uint8."""
    return torch.cat([t.contiguous().view(torch.uint8) for t in tensors], dim=1)


def _split_bytes(buf: torch.Tensor, spec: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of _bytes: spec is (dtype, columns) per tensor."""
    out, col = [], 0
    for dtype, cols in spec:
        width = cols * torch.empty((), dtype=dtype).element_size()
        out.append(buf[:, col:col + width].contiguous().view(dtype))
        col += width
    return out


class DistributedCache:
    """One distributed forward's residuals on one rank: consumed by the collective moe_backward of that forward.

    On the owner it holds the MoECache of the whole batch; elsewhere only the rank's row counts.
    """

    __slots__ = ("_group", "_forward", "_lengths", "_meta", "_inner", "_consumed", "__weakref__")

    def __init__(self, group: ExpertGroup, forward: int, lengths: list[int], meta: dict, inner: MoECache | None):
        self._group = group
        self._forward = forward  # the forward's number in its group: pairs backward with forward across ranks
        self._lengths = lengths
        self._meta = meta
        self._inner = inner
        self._consumed = False

    @property
    def consumed(self) -> bool:
        return self._consumed

    @property
    def nbytes(self) -> int:
        return 0 if self._consumed or self._inner is None else self._inner.nbytes

    @property
    def num_tokens(self) -> int:
        return self._meta["T"]

    def __repr__(self):
        return f"DistributedCache(T={self.num_tokens}, forward={self._forward}, consumed={self._consumed})"


def moe_forward(state: MoEState | None, x, ids, w, *, group: ExpertGroup, save_for_backward: bool = True):
    """Collective: the expert layer of this rank's tokens, computed by the owner of group; returns (y, cache).

    The owner passes its MoEState, the other ranks None. x [T, H], ids [T, k], w [T, k] as in ops.moe_forward;
    T may differ between ranks and be 0; k and save_for_backward must be the same on every rank. The cache
    (None without save_for_backward) goes to the collective moe_backward.
    """
    group = _check_group(group)
    error, row = None, [1] + [0] * (_ROW - 1)  # the row of a rank whose checks failed
    try:
        _check_state(group, state)
        x, x_np, ids, w = routing_inputs(x, ids, w, None)  # H is checked against the owner's below
        (T, H), k = x.shape, ids.shape[1]
        lo, hi = (int(ids.min()), int(ids.max())) if T else (0, -1)
        E, owner_H = (state.weights.num_experts, state.weights.hidden_size) if group.is_owner else (0, 0)
        row = [0, T, k, H, int(x.dtype == torch.float32), int(bool(save_for_backward)), lo, hi, E, owner_H]
    except (TypeError, ValueError) as e:
        error = e
    table = group._all_gather_rows(row, "exchanging the token counts of an expert layer forward")
    _raise_for_rank_errors(group, table, error)
    _check_forward_table(group, table)
    forward = next(group._forwards)
    lengths = table[:, _T].tolist()
    y_dtype = torch.float32 if table[:, _X_FP32].any() else torch.bfloat16  # the common dtype of y and dx
    meta = {"T": T, "k": k, "H": H, "x_dtype": x.dtype, "w_dtype": w.dtype, "numpy": x_np, "device": x.device,
            "y_dtype": y_dtype}
    dev = group._device()
    tokens = _bytes(cpu_contiguous(x, torch.bfloat16), cpu_contiguous(ids, torch.int32),
                    cpu_contiguous(w, torch.float32)).to(dev)
    others = [r for r in range(group.size) if r != group.owner and lengths[r]]
    inner = None
    if group.is_owner:
        received = {r: torch.empty(lengths[r], tokens.shape[1], dtype=torch.uint8, device=dev) for r in others}
        group._exchange({}, received, "receiving the tokens of an expert layer forward")
        chunks = [tokens if r == group.owner else received.get(r, tokens[:0]) for r in range(group.size)]
        xs, idss, ws = _split_bytes(torch.cat(chunks).cpu(), [(torch.bfloat16, H), (torch.int32, k), (torch.float32, k)])
        failure = None
        try:
            y_all, inner = ops.moe_forward(state, xs.to(y_dtype), idss, ws, save_for_backward=save_for_backward)
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
            failure = e
        group._settle(failure)
        rows = list(y_all.split(lengths))
        group._exchange({r: rows[r].to(dev) for r in others}, {}, "returning the rows of an expert layer forward")
        y = rows[group.owner]
    else:
        group._exchange({group.owner: tokens} if T else {}, {}, "sending the tokens of an expert layer forward")
        group._settle(None)
        y = torch.empty(T, H, dtype=y_dtype, device=dev)
        group._exchange({}, {group.owner: y} if T else {}, "receiving the rows of an expert layer forward")
    y = to_kind(y.cpu().to(x.dtype), x_np, x.device)
    cache = DistributedCache(group, forward, lengths, meta, inner) if save_for_backward else None
    return y, cache


def moe_backward(state: MoEState | None, cache: DistributedCache, gy, *, group: ExpertGroup) -> Grads:
    """Collective: the gradients of a distributed forward given this rank's gy = dL/dy [T, H]; consumes the cache.

    Returns this rank's Grads: x and w for its own rows; on the owner also lora, the LoRA gradients over every
    rank's tokens (summed); lora is None elsewhere.
    """
    group = _check_group(group)
    error, forward = None, -1
    try:
        _check_state(group, state)
        if not isinstance(cache, DistributedCache):
            raise TypeError(f"cache: expected the DistributedCache of a distributed moe_forward "
                            f"(save_for_backward=True), got {type(cache).__name__}")
        if cache._group is not group:
            raise ValueError("cache: it was made by a forward in another ExpertGroup")
        if cache.consumed:
            raise ValueError("cache: already consumed by a moe_backward; each forward's cache can be used once")
        meta = cache._meta
        gy, _ = as_tensor(gy, "gy")
        check_dtype(gy, "gy", FLOAT_DTYPES)
        check_shape(gy, "gy", (meta["T"], meta["H"]), f"[T, H] = {[meta['T'], meta['H']]} like the forward's y")
        forward = cache._forward
    except (TypeError, ValueError) as e:
        error = e
    table = group._all_gather_rows([int(error is not None), forward], "starting an expert layer backward")
    _raise_for_rank_errors(group, table, error)
    forwards = table[:, 1].tolist()
    if len(set(forwards)) > 1:
        raise ValueError(f"cache: the ranks run the backward of different forwards (forward number per rank: "
                         f"{forwards}); every rank must run the same expert-layer backwards in the same order")
    cache._consumed = True
    lengths, T, k, H = cache._lengths, meta["T"], meta["k"], meta["H"]
    y_dtype, dev = meta["y_dtype"], group._device()
    others = [r for r in range(group.size) if r != group.owner and lengths[r]]
    gyb = cpu_contiguous(gy, torch.bfloat16).to(dev)
    lora = None
    spec = [(y_dtype, H), (torch.float32, k)]
    if group.is_owner:
        received = {r: torch.empty(lengths[r], H, dtype=torch.bfloat16, device=dev) for r in others}
        group._exchange({}, received, "receiving the gradients of an expert layer backward")
        gy_all = torch.cat([gyb if r == group.owner else received.get(r, gyb[:0]) for r in range(group.size)]).cpu()
        inner, cache._inner = cache._inner, None
        failure = None
        try:
            grads = ops.moe_backward(state, inner, gy_all)
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
            failure = e
        group._settle(failure)
        rows = [_bytes(dx, dw) for dx, dw in zip(grads.x.split(lengths), grads.w.float().split(lengths))]
        group._exchange({r: rows[r].to(dev) for r in others}, {}, "returning the rows of an expert layer backward")
        mine, lora = rows[group.owner], grads.lora
    else:
        group._exchange({group.owner: gyb} if T else {}, {}, "sending the gradients of an expert layer backward")
        group._settle(None)
        width = H * torch.empty((), dtype=y_dtype).element_size() + 4 * k
        mine = torch.empty(T, width, dtype=torch.uint8, device=dev)
        group._exchange({}, {group.owner: mine} if T else {}, "receiving the rows of an expert layer backward")
    dx, dw = _split_bytes(mine.cpu(), spec)
    numpy, device = meta["numpy"], meta["device"]
    return Grads(x=to_kind(dx.to(meta["x_dtype"]), numpy, device), w=to_kind(dw.to(meta["w_dtype"]), numpy, device),
                 lora=lora)


# ---- torch autograd ----------------------------------------------------------------------------------------------
#
# As in kt_functional.torch, a forward's cache travels to the backward inside a small tensor that autograd
# saves: non-reentrant gradient checkpointing drops it after the forward and its recomputation (which every
# rank runs at the same point of its backward) makes a new one, so no expert cache is held twice.

class _Residuals(np.ndarray):
    """int64[1]; its attributes own one forward's state and DistributedCache."""


_HOLDERS: "weakref.WeakValueDictionary[int, _Residuals]" = weakref.WeakValueDictionary()


def _residuals_tensor(state: MoEState | None, cache: DistributedCache) -> torch.Tensor:
    holder = np.zeros(1, dtype=np.int64).view(_Residuals)
    holder.state, holder.cache = state, cache
    t = torch.from_numpy(holder)
    _HOLDERS[t.data_ptr()] = holder
    return t


class _DistributedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, base, alpha, lora_grad_scale, save, x, ids, w, anchor, *lora):
        state = replace(base, lora=LoRA(*lora, alpha=alpha)) if lora else base
        y, cache = moe_forward(state, x, ids, w, group=group, save_for_backward=save)
        if save:
            ctx.save_for_backward(_residuals_tensor(state, cache))
        ctx.group, ctx.lora_grad_scale, ctx.lora_dtypes = group, lora_grad_scale, [t.dtype for t in lora]
        return y

    @staticmethod
    def backward(ctx, gy):
        (residuals,) = ctx.saved_tensors
        holder = _HOLDERS.get(residuals.data_ptr())
        if holder is None:
            raise RuntimeError("kt_functional.distributed: the residuals of this expert-layer forward were freed "
                               "(saved-tensor hooks that copy tensors are not supported)")
        grads = moe_backward(holder.state, holder.cache, gy, group=ctx.group)
        dlora = []
        if grads.lora is not None:
            dlora = [(getattr(grads.lora, name) * ctx.lora_grad_scale).to(dtype)
                     for name, dtype in zip(_LORA_NAMES, ctx.lora_dtypes)]
        return (None, None, None, None, None, grads.x, None, grads.w, None, *dlora)


def experts(group: ExpertGroup, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, state: MoEState | None = None,
            lora: list[torch.Tensor] | tuple = (), alpha: float = 32.0, lora_grad_scale: float = 1.0) -> torch.Tensor:
    """Differentiable collective expert layer: y of this rank's tokens (x's dtype).

    The owner passes its LoRA-less MoEState and the LoRA tensors; the other ranks neither. With grad enabled,
    y requires grad on every rank, so every rank's backward reaches the collective backward.
    """
    out_dtype = x.dtype
    x, w = _kernel_dtype(x), _kernel_dtype(w)
    lora = [_kernel_dtype(t) for t in lora]
    save = torch.is_grad_enabled()
    anchor = torch.empty(0, requires_grad=save)  # makes y differentiable on ranks whose inputs are not
    y = _DistributedExperts.apply(group, state, float(alpha), float(lora_grad_scale), save, x, ids, w, anchor, *lora)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def check_lora_grad_reduction(reduction: str) -> str:
    if reduction not in LORA_GRAD_REDUCTIONS:
        raise ValueError(f"lora_grad_reduction: expected one of {LORA_GRAD_REDUCTIONS}, got {reduction!r}")
    return reduction


class OwnerExperts(KTExperts):
    """The owner's KTExperts: its forward computes every rank's tokens of this layer (collective).

    lora_grad_reduction="sum": the LoRA gradients are summed over the ranks' tokens; "mean" divides them by the
    number of ranks, as DDP averages the other parameters' gradients.
    """

    def __init__(self, group: ExpertGroup, *args, lora_grad_reduction: str = "sum", **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_group = _check_group(group)
        self.lora_grad_scale = 1.0 if check_lora_grad_reduction(lora_grad_reduction) == "sum" else 1.0 / group.size

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts(self.expert_group, hidden_states, top_k_index, top_k_weights, self._state,
                       self.lora_tensors(), self.lora_alpha, self.lora_grad_scale)


class RemoteExperts(nn.Module):
    """A non-owner rank's stand-in for the routed experts: no weights, no parameters; its forward sends the tokens
    to the owner (collective)."""

    def __init__(self, group: ExpertGroup, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.expert_group = _check_group(group)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts(self.expert_group, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, owner=rank {self.expert_group.owner}")


def group_of(model: nn.Module) -> ExpertGroup | None:
    """The ExpertGroup of a model patched with owner_rank (on any rank), else None."""
    for module in model.modules():
        if isinstance(module, (OwnerExperts, RemoteExperts)):
            return module.expert_group
    return None


__all__ = ["ExpertGroup", "DistributedCache", "ExchangeError", "moe_forward", "moe_backward", "experts",
           "OwnerExperts", "RemoteExperts", "group_of", "LORA_GRAD_REDUCTIONS"]
