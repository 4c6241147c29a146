"""Explicit, immutable state of an expert layer: packed weights, LoRA adapters, worker pool."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from . import _core
from ._convert import DTYPE_CODE, FLOAT_DTYPES, as_tensor, check_alpha, check_dtype, check_int, check_threads

MAX_LORA_RANK = 128
BACKWARD_WEIGHTS = ("on_the_fly", "resident")


def _expert_tensor(value, name: str, dims: int = 3) -> torch.Tensor:
    t, _ = as_tensor(value, name)
    if t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {str(t.dtype).replace('torch.', '')}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in FLOAT_DTYPES:  # fp16 / fp64 sources: packed from an fp32 copy
        t = t.float()
    return t


def _spec(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), DTYPE_CODE[t.dtype], tuple(t.stride()))


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_threads(threads, name: str = "threads") -> int:
    """None: one worker per CPU this process may run on; else an int in 1..MAX_THREADS."""
    return _default_threads() if threads is None else check_threads(threads, name)


def check_lora_options(lora_rank, lora_alpha) -> tuple[int | None, float]:
    """(lora_rank, lora_alpha) of a module or model to patch: rank None (no LoRA) or in 1..MAX_LORA_RANK."""
    if lora_rank is not None:
        lora_rank = check_int(lora_rank, "lora_rank", 1, MAX_LORA_RANK)
    return lora_rank, check_alpha(lora_alpha, lora_rank, "lora_alpha")


# Activations of the kernels' epilogues -> (kt::Activation code, the swish alpha it implies or None).
ACTIVATIONS = {
    "silu": (0, 1.0), "quick_gelu": (0, 1.702), "swish": (0, None), "gelu": (1, None), "gelu_tanh": (2, None),
    "relu": (3, None), "relu2": (4, None),
}


@dataclass(frozen=True)
class ExpertVariant:
    """What an expert computes between its projections (MATH.md, "Expert variants").

    gated: h = act(min(g, limit)) * (clamp(u, -limit, limit) + up_offset); not gated: h = act(u) (one
    projection; gate is unused). activation: silu, gelu (erf), gelu_tanh (gelu_pytorch_tanh / gelu_new),
    quick_gelu, relu, relu2 (squared ReLU), or swish (z * sigmoid(alpha z), gpt-oss with alpha=1.702).
    limit: None for no clamp (gated only). The default is SwiGLU.
    """

    gated: bool = True
    activation: str = "silu"
    alpha: float | None = None
    limit: float | None = None
    up_offset: float = 0.0

    def __post_init__(self):
        if not isinstance(self.gated, bool):
            raise TypeError(f"gated: expected a bool, got {self.gated!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.activation == "swish":
            if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
                raise ValueError(f"alpha: activation 'swish' needs a finite alpha, got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"alpha: only activation 'swish' takes an alpha, got {self.alpha!r} for "
                             f"{self.activation!r}")
        if self.limit is not None:
            if not self.gated:
                raise ValueError("limit: clamps apply to gated experts only (gated=False)")
            if not isinstance(self.limit, (int, float)) or not self.limit > 0:
                raise ValueError(f"limit: expected a number > 0 or None, got {self.limit!r}")
            object.__setattr__(self, "limit", float(self.limit))
        if not isinstance(self.up_offset, (int, float)) or not math.isfinite(self.up_offset):
            raise TypeError(f"up_offset: expected a finite number, got {self.up_offset!r}")
        if self.up_offset and not self.gated:
            raise ValueError("up_offset: applies to gated experts only (gated=False)")
        object.__setattr__(self, "up_offset", float(self.up_offset))

    def kernel_args(self) -> tuple:
        """(gated, activation code, alpha, limit, up_offset) as the kernels take them."""
        code, implied_alpha = ACTIVATIONS[self.activation]
        alpha = self.alpha if implied_alpha is None and self.alpha is not None else (implied_alpha or 1.0)
        limit = math.inf if self.limit is None else self.limit
        return self.gated, code, alpha, limit, self.up_offset


SWIGLU = ExpertVariant()


def _bias(value, name: str, shape: tuple[int, int]) -> torch.Tensor | None:
    if value is None:
        return None
    t = _expert_tensor(value, name, dims=2)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    return t.float().contiguous()


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """The frozen routed-expert weights of one MoE layer, packed once for every ISA path.

    The packed copy is all that stays alive: the source tensors can be dropped afterwards.
    """

    packed: _core.PackedExperts = field(repr=False)
    num_experts: int
    hidden_size: int
    intermediate_size: int
    backward_weights: str = "on_the_fly"
    variant: ExpertVariant = SWIGLU
    gate_bias: torch.Tensor | None = field(default=None, repr=False)  # [E, I] fp32, frozen
    up_bias: torch.Tensor | None = field(default=None, repr=False)    # [E, I]
    down_bias: torch.Tensor | None = field(default=None, repr=False)  # [E, H]

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed weights."""
        return self.packed.nbytes

    @property
    def storage(self) -> str:
        """How the base weights are stored ("bf16")."""
        return "bf16"

    # Immutable: copies share the packed weights. Pickling writes the bf16 values and repacks them on load.
    def __copy__(self) -> "ExpertWeights":
        return self

    def __deepcopy__(self, memo) -> "ExpertWeights":
        return self

    def __reduce__(self):
        gate, up, down = (t.bfloat16() for t in self.dequantize())  # bf16-exact: no rounding
        return _unpickle_expert_weights, (gate if self.variant.gated else None, up, down, self.backward_weights,
                                          self.variant, self.gate_bias, self.up_bias, self.down_bias)

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.gate_bias, self.up_bias, self.down_bias))

    def variant_args(self) -> tuple:
        """The variant and the bias pointers (0: none) as the kernels take them."""
        ptrs = tuple(0 if b is None else b.data_ptr() for b in (self.gate_bias, self.up_bias, self.down_bias))
        return self.variant.kernel_args() + ptrs

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [E, I, H], up [E, I, H], down [E, H, I]) in fp32: exactly the values the kernels multiply by."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        gate, up, down = torch.empty(E, I, H), torch.empty(E, I, H), torch.empty(E, H, I)
        self.packed.dequantize(gate.data_ptr(), up.data_ptr(), down.data_ptr())
        return gate, up, down

    @classmethod
    def from_tensors(cls, gate, up, down, *, threads: int | None = None, backward_weights: str = "on_the_fly",
                     variant: ExpertVariant = SWIGLU, gate_bias=None, up_bias=None,
                     down_bias=None) -> "ExpertWeights":
        """gate, up: [E, I, H]; down: [E, H, I]; bf16 or fp32 (any strides: transposed or interleaved
        storage is read straight into the packed layout), torch or numpy.

        variant: what the experts compute (ExpertVariant; SwiGLU by default); a non-gated variant takes
        gate=None. gate_bias, up_bias [E, I] and down_bias [E, H]: frozen biases (kept in fp32).
        One packed copy: the backward GEMMs transpose it per (expert, column block) on the fly.
        backward_weights="resident" also keeps the transposed layout (twice the memory).
        """
        if backward_weights not in BACKWARD_WEIGHTS:
            raise ValueError(f"backward_weights: expected one of {BACKWARD_WEIGHTS}, got {backward_weights!r}")
        if not isinstance(variant, ExpertVariant):
            raise TypeError(f"variant: expected ExpertVariant, got {type(variant).__name__}")
        if variant.gated:
            gate = _expert_tensor(gate, "gate")
        elif gate is not None:
            raise ValueError("gate: a non-gated variant (variant.gated=False) has no gate projection; pass None")
        up = _expert_tensor(up, "up")
        down = _expert_tensor(down, "down")
        E, I, H = (gate if variant.gated else up).shape
        if not variant.gated:  # the gate panels stay zero: a stride-0 view costs no memory
            gate = torch.zeros(1, 1, 1, dtype=up.dtype).expand(E, I, H)
        elif tuple(up.shape) != (E, I, H):
            raise ValueError(f"up: expected shape [E, I, H] = {[E, I, H]} like gate, got {list(up.shape)}")
        if tuple(down.shape) != (E, H, I):
            raise ValueError(f"down: expected shape [E, H, I] = {[E, H, I]}, got {list(down.shape)}")
        if min(E, I, H) < 1:
            raise ValueError(f"{'gate' if variant.gated else 'up'}: every dimension must be >= 1, got {[E, I, H]}")
        if gate_bias is not None and not variant.gated:
            raise ValueError("gate_bias: a non-gated variant has no gate projection")
        biases = (_bias(gate_bias, "gate_bias", (E, I)), _bias(up_bias, "up_bias", (E, I)),
                  _bias(down_bias, "down_bias", (E, H)))
        pool = _core.Pool(resolve_threads(threads))
        packed = _core.PackedExperts(E, H, I, _spec(gate), _spec(up), _spec(down), pool,
                                     backward_weights == "resident")
        return cls(packed, E, H, I, backward_weights, variant, *biases)

    @classmethod
    def from_fused(cls, gate_up, down, *, threads: int | None = None,
                   backward_weights: str = "on_the_fly") -> "ExpertWeights":
        """transformers v5 layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
        gate_up = _expert_tensor(gate_up, "gate_up")
        if gate_up.shape[1] % 2:
            raise ValueError(f"gate_up: expected shape [E, 2I, H] with an even middle size, got {list(gate_up.shape)}")
        I = gate_up.shape[1] // 2
        return cls.from_tensors(gate_up[:, :I], gate_up[:, I:], down, threads=threads,
                                backward_weights=backward_weights)


def _unpickle_expert_weights(gate, up, down, backward_weights: str, variant: ExpertVariant = SWIGLU,
                             gate_bias=None, up_bias=None, down_bias=None) -> ExpertWeights:
    return ExpertWeights.from_tensors(gate, up, down, backward_weights=backward_weights, variant=variant,
                                      gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias)


_LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def _lora_shapes(E: int, H: int, I: int, r: int) -> dict[str, tuple]:
    return {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H),
            "up_b": (E, I, r), "down_a": (E, r, I), "down_b": (E, H, r)}


def _check_lora_tensor(t: torch.Tensor, name: str) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D tensor (one matrix per expert), got shape {list(t.shape)}")
    check_dtype(t, name, FLOAT_DTYPES)
    if t.device.type != "cpu":
        raise ValueError(f"{name}: LoRA tensors must live on the CPU, got device {t.device}")


def _check_lora_set(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple], origin: str, prefix: str = "") -> None:
    dtype = tensors["gate_a"].dtype
    for name, t in tensors.items():
        if t.dtype != dtype:
            raise TypeError(f"{prefix}{name}: all six LoRA tensors must share one dtype, got {str(t.dtype)[6:]} "
                            f"and {str(dtype)[6:]} for gate_a")
    E, r, H = shapes["gate_a"]
    I = shapes["gate_b"][1]
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{prefix}{name}: expected shape {list(shape)} (E={E}, r={r}, H={H}, I={I} {origin}), "
                             f"got {list(tensors[name].shape)}")


@dataclass(frozen=True, eq=False)
class LoRA:
    """LoRA adapters on every expert's gate, up and down projections, in PEFT's shapes:

    gate_a, up_a [E, r, H]; gate_b, up_b [E, I, r]; down_a [E, r, I]; down_b [E, H, r].
    All six share one dtype (bf16 or fp32). The kernels read these tensors at every call, so an
    optimizer's in-place updates are seen by the next call with no sync step; modifying them
    between a forward and its backward is an error (as in torch autograd).
    """

    gate_a: torch.Tensor
    gate_b: torch.Tensor
    up_a: torch.Tensor
    up_b: torch.Tensor
    down_a: torch.Tensor
    down_b: torch.Tensor
    alpha: float = 32.0
    _shapes: dict = field(init=False, repr=False)  # the six shapes at construction, checked at every call

    def __post_init__(self):
        tensors = {}
        for name in _LORA_NAMES:
            t, _ = as_tensor(getattr(self, name), name)
            _check_lora_tensor(t, name)
            tensors[name] = t
            object.__setattr__(self, name, t)
        E, r, H = tensors["gate_a"].shape
        I = tensors["gate_b"].shape[1]
        _check_lora_set(tensors, _lora_shapes(E, H, I, r), "from gate_a/gate_b")
        if not 1 <= r <= MAX_LORA_RANK:
            raise ValueError(f"gate_a: LoRA rank must be in 1..{MAX_LORA_RANK}, got {r}")
        object.__setattr__(self, "alpha", check_alpha(self.alpha, r))
        object.__setattr__(self, "_shapes", _lora_shapes(E, H, I, r))

    def checked_tensors(self) -> list[torch.Tensor]:
        """The six tensors as they are now, checked again: a framework may have replaced a tensor's
        storage (`p.data = ...`) since this LoRA was built, and the kernels trust these shapes."""
        tensors = {}
        for name in _LORA_NAMES:
            t = getattr(self, name)
            _check_lora_tensor(t, f"lora.{name}")
            tensors[name] = t
        _check_lora_set(tensors, self._shapes, "as when the LoRA was built", prefix="lora.")
        return list(tensors.values())

    @property
    def rank(self) -> int:
        return self.gate_a.shape[1]

    def __repr__(self) -> str:  # shapes, not the tensors' values
        E, H, I, r = self.shape
        return f"LoRA(E={E}, H={H}, I={I}, rank={r}, alpha={self.alpha}, dtype={str(self.gate_a.dtype)[6:]})"

    @property
    def scale(self) -> float:
        """s = alpha / r (MATH.md)."""
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(E, H, I, r)."""
        return self.gate_a.shape[0], self.gate_a.shape[2], self.gate_b.shape[1], self.rank

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _LORA_NAMES}

    @classmethod
    def init(cls, weights: ExpertWeights, rank: int = 16, alpha: float = 32.0, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> "LoRA":
        """PEFT's initialisation: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        if not isinstance(weights, ExpertWeights):
            raise TypeError(f"weights: expected ExpertWeights, got {type(weights).__name__}")
        rank = check_int(rank, "rank", 1, MAX_LORA_RANK)
        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        gen = torch.Generator().manual_seed(seed)

        def a(fan_out, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return (torch.rand(E, fan_out, fan_in, generator=gen) * 2 - 1).mul_(bound).to(dtype)

        return cls(
            gate_a=a(rank, H), gate_b=torch.zeros(E, I, rank, dtype=dtype),
            up_a=a(rank, H), up_b=torch.zeros(E, I, rank, dtype=dtype),
            down_a=a(rank, I), down_b=torch.zeros(E, H, rank, dtype=dtype),
            alpha=alpha,
        )


@dataclass(frozen=True, eq=False)
class MoEState:
    """Everything a call needs: packed weights, optional LoRA, thread count and ISA path.

    Workers come from a pool shared by all states with the same thread count.
    """

    weights: ExpertWeights
    lora: LoRA | None = None
    threads: int = 2
    isa: str | None = None
    _pool: _core.Pool = field(init=False, repr=False)
    _token: object = field(init=False, repr=False)  # identifies this state's caches

    def __post_init__(self):
        if not isinstance(self.weights, ExpertWeights):
            raise TypeError(f"weights: expected ExpertWeights, got {type(self.weights).__name__}")
        if self.lora is not None:
            if not isinstance(self.lora, LoRA):
                raise TypeError(f"lora: expected LoRA or None, got {type(self.lora).__name__}")
            E, H, I, _ = self.lora.shape
            w = self.weights
            if (E, H, I) != (w.num_experts, w.hidden_size, w.intermediate_size):
                raise ValueError(
                    f"lora: adapters are for (E, H, I) = {(E, H, I)}, weights are "
                    f"{(w.num_experts, w.hidden_size, w.intermediate_size)}"
                )
        object.__setattr__(self, "threads", check_threads(self.threads))
        isa = _core.default_isa() if self.isa is None else self.isa
        if isa not in _core.runnable_isas():
            raise ValueError(f"isa: '{isa}' cannot run here; available: {_core.runnable_isas()}")
        object.__setattr__(self, "isa", isa)
        object.__setattr__(self, "_pool", _core.Pool(self.threads))
        object.__setattr__(self, "_token", object())

    def __reduce__(self):  # the pool and cache token are per process and per state: made anew
        return MoEState, (self.weights, self.lora, self.threads, self.isa)

    def lora_args(self) -> tuple[tuple | None, list[torch.Tensor]]:
        """Pointers of the LoRA tensors as they are now (checked again), and the tensors to keep alive meanwhile."""
        if self.lora is None:
            return None, []
        ts = [t.detach().contiguous() for t in self.lora.checked_tensors()]
        ptrs = tuple(t.data_ptr() for t in ts)
        return ptrs + (DTYPE_CODE[ts[0].dtype], self.lora.rank, self.lora.scale), ts

    def lora_stamp(self) -> tuple[tuple, list[torch.Tensor]] | None:
        """(key, anchor) of the LoRA tensors' contents now. The key holds per tensor its version counter
        (in-place changes), data pointer and strides (a replaced storage, `p.data = ...`); compare keys
        while holding the anchor, views that keep those storages alive so that no other tensor can get
        their addresses meanwhile."""
        if self.lora is None:
            return None
        tensors = [getattr(self.lora, name) for name in _LORA_NAMES]
        return tuple((t._version, t.data_ptr(), t.stride()) for t in tensors), [t.detach() for t in tensors]


__all__ = ["ExpertVariant", "ExpertWeights", "LoRA", "MoEState", "ACTIVATIONS"]
