"""Explicit, immutable state of an expert layer: packed weights, LoRA adapters, worker pool."""
from __future__ import annotations

import glob
import math
import os
import weakref
from dataclasses import dataclass, field

import torch

from . import _core, quant
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
    Partitioned weights (from_tensors(..., partitions=N or numa=True)) hold one packed copy of each slice
    of the intermediate dimension I instead (parts), each packed by the workers of its partition.
    """

    packed: _core.PackedExperts | None = field(repr=False)  # None when partitioned: the parts hold the slices
    num_experts: int
    hidden_size: int
    intermediate_size: int
    backward_weights: str = "on_the_fly"
    parts: tuple = field(default=(), repr=False)  # the ExpertWeights of each slice of I, in order
    part_cpus: tuple = field(default=(), repr=False)  # the CPUs whose workers packed each part (() = any)
    numa: bool = False  # partitioned per NUMA node
    variant: ExpertVariant = SWIGLU
    gate_bias: torch.Tensor | None = field(default=None, repr=False)  # [E, I] fp32, frozen
    up_bias: torch.Tensor | None = field(default=None, repr=False)    # [E, I]
    down_bias: torch.Tensor | None = field(default=None, repr=False)  # [E, H]

    @property
    def partitions(self) -> int:
        return len(self.parts) or 1

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed weights."""
        return sum(p.nbytes for p in self.parts) if self.parts else self.packed.nbytes

    @property
    def storage(self) -> str:
        """How the base weights are stored: one of "bf16", "int8", "fp8_block", "int4_group", "mxfp4"."""
        return self.parts[0].storage if self.parts else quant.STORAGES[self.packed.storage]

    # Immutable: copies share the packed weights. Pickling writes the bf16 values (or a quantized storage's
    # packed bytes) and repacks them on load.
    def __copy__(self) -> "ExpertWeights":
        return self

    def __deepcopy__(self, memo) -> "ExpertWeights":
        return self

    def __reduce__(self):
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        variant = (self.variant, self.gate_bias, self.up_bias, self.down_bias)
        if self.storage != "bf16" and self.parts:  # each part pickles its own packed bytes
            return _unpickle_quantized_parts, (E, H, I, self.parts, self.part_cpus, self.numa, *variant)
        if self.storage != "bf16":
            return _unpickle_quantized, (E, H, I, self.packed.storage, self.packed.scale_type,
                                         *self.packed.quantized_bytes(), *variant, PACKED_LAYOUT)
        gate, up, down = (t.bfloat16() for t in self.dequantize())  # bf16-exact: no rounding
        return _unpickle_expert_weights, (gate if self.variant.gated else None, up, down, self.backward_weights,
                                          self.partitions, self.numa, self.variant, self.gate_bias, self.up_bias,
                                          self.down_bias)

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.gate_bias, self.up_bias, self.down_bias))

    def variant_args(self) -> tuple:
        """The variant and the bias pointers (0: none) as the kernels take them (of a part, for partitions)."""
        ptrs = tuple(0 if b is None else b.data_ptr() for b in (self.gate_bias, self.up_bias, self.down_bias))
        return self.variant.kernel_args() + ptrs

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [E, I, H], up [E, I, H], down [E, H, I]) in fp32: exactly the values the kernels multiply by.

        A quantized storage's kernels decode it to bf16 panels for the micro-kernels, so these are those
        bf16-rounded values, bf16(code * scale). One exception: an expert with at most 16 rows (4 for int8
        and fp8_block) on the avx512 and amx paths is multiplied straight from its codes, forward and
        backward (each code's value is a bf16; the scales multiply fp32 sums), that is by code * scale
        itself, within one bf16 rounding of these: its gradients are those of the function its forward
        computed.
        """
        if self.parts:
            gates, ups, downs = zip(*(p.dequantize() for p in self.parts))
            return torch.cat(gates, dim=1), torch.cat(ups, dim=1), torch.cat(downs, dim=2)
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        gate, up, down = torch.empty(E, I, H), torch.empty(E, I, H), torch.empty(E, H, I)
        self.packed.dequantize(gate.data_ptr(), up.data_ptr(), down.data_ptr())
        return gate, up, down

    @classmethod
    def from_tensors(cls, gate, up, down, *, storage: str = "bf16", threads: int | None = None,
                     backward_weights: str = "on_the_fly", partitions: int = 1, numa: bool = False,
                     variant: ExpertVariant = SWIGLU, gate_bias=None, up_bias=None, down_bias=None) -> "ExpertWeights":
        """gate, up: [E, I, H]; down: [E, H, I]; bf16 or fp32 (any strides: transposed or interleaved
        storage is read straight into the packed layout), torch or numpy.

        storage: "bf16" packs the values as they are (fp32 rounded to bf16); "int8", "fp8_block",
        "int4_group", "mxfp4" quantize them first (kt_functional.quant) and pack that format.
        variant: what the experts compute (ExpertVariant; SwiGLU by default); a non-gated variant takes
        gate=None. gate_bias, up_bias [E, I] and down_bias [E, H]: frozen biases (kept in fp32).
        One packed copy: the backward GEMMs transpose it per (expert, column block) on the fly.
        backward_weights="resident" also keeps the transposed layout (twice the memory; bf16 only).
        partitions=N / numa=True: one packed copy per slice of I instead, each packed by its partition's
        workers (pinned to its node's CPUs where there are several nodes); see MoEState. A quantized
        storage quantizes each slice on its own.
        """
        if backward_weights not in BACKWARD_WEIGHTS:
            raise ValueError(f"backward_weights: expected one of {BACKWARD_WEIGHTS}, got {backward_weights!r}")
        quant.check_storage(storage)
        if storage != "bf16" and backward_weights != "on_the_fly":
            raise ValueError(f"backward_weights: 'resident' keeps a transposed bf16 copy; storage={storage!r} "
                             "decodes its operands on the fly only")
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
        gate_bias, up_bias, down_bias = (_bias(gate_bias, "gate_bias", (E, I)), _bias(up_bias, "up_bias", (E, I)),
                                         _bias(down_bias, "down_bias", (E, H)))
        threads = resolve_threads(threads)
        plan = _partition_plan(I, threads, partitions, numa)
        if plan is None:
            return cls._pack(gate, up, down, _core.Pool(threads), backward_weights, variant, gate_bias, up_bias,
                             down_bias, storage)

        def cut(bias, lo, hi):
            return None if bias is None else bias[:, lo:hi].contiguous()

        # Slices of I: the gate / up biases are sliced with them; the down bias is added once (first part).
        parts = tuple(cls._pack(gate[:, lo:hi], up[:, lo:hi], down[:, :, lo:hi], pool, backward_weights, variant,
                                cut(gate_bias, lo, hi), cut(up_bias, lo, hi), down_bias if lo == 0 else None, storage)
                      for (lo, hi), pool in zip(plan.ranges, _partition_pools(plan.threads, plan.cpus)))
        return cls(None, E, H, I, backward_weights, parts, plan.cpus, numa, variant=variant, gate_bias=gate_bias,
                   up_bias=up_bias, down_bias=down_bias)

    @classmethod
    def _pack(cls, gate, up, down, pool: _core.Pool, backward_weights: str, variant: ExpertVariant = SWIGLU,
              gate_bias=None, up_bias=None, down_bias=None, storage: str = "bf16") -> "ExpertWeights":
        """Packs checked tensors on pool's workers (so the pages are first touched where they run)."""
        E, I, H = up.shape
        if storage != "bf16":
            return cls._pack_quantized(storage, *(quant.quantize(storage, t) for t in (gate, up, down)), pool,
                                       variant=variant, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias)
        packed = _core.PackedExperts(E, H, I, _spec(gate), _spec(up), _spec(down), pool,
                                     backward_weights == "resident")
        return cls(packed, E, H, I, backward_weights, variant=variant, gate_bias=gate_bias, up_bias=up_bias,
                   down_bias=down_bias)

    @classmethod
    def from_fused(cls, gate_up, down, *, storage: str = "bf16", threads: int | None = None,
                   backward_weights: str = "on_the_fly", partitions: int = 1, numa: bool = False) -> "ExpertWeights":
        """transformers v5 layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
        gate_up = _expert_tensor(gate_up, "gate_up")
        if gate_up.shape[1] % 2:
            raise ValueError(f"gate_up: expected shape [E, 2I, H] with an even middle size, got {list(gate_up.shape)}")
        I = gate_up.shape[1] // 2
        return cls.from_tensors(gate_up[:, :I], gate_up[:, I:], down, storage=storage, threads=threads,
                                backward_weights=backward_weights, partitions=partitions, numa=numa)

    @classmethod
    def from_quantized(cls, storage: str, gate, up, down, *, threads: int | None = None) -> "ExpertWeights":
        """Packs a quantized checkpoint's experts as they are (no float copy). Each of gate / up / down is
        the tuple of that projection's tensors stacked over experts (gate, up: out = I, in = H; down:
        out = H, in = I):

            "int8"        (weight int8 [E, out, in], scale fp32 [E, out])
            "fp8_block"   (weight float8_e4m3fn [E, out, in], scale_inv fp32 [E, ceil(out/128), ceil(in/128)])
            "int4_group"  (weight_packed int32 [E, out, ceil(in/8)], weight_scale bf16/fp16/fp32 [E, out, ceil(in/32)])
            "mxfp4"       (blocks uint8 [E, out, ceil(in/32), 16], scales uint8 [E, out, ceil(in/32)])

        Partial 128-blocks and 32-groups at the edges are allowed (the last block or group is shorter).
        Unpartitioned (MoEState(..., partitions=N) makes a partitioned bf16 copy of dequantize()'s values).
        """
        quant.check_storage(storage)
        if storage == "bf16":
            raise ValueError("storage: 'bf16' weights are packed with ExpertWeights.from_tensors")
        threads = resolve_threads(threads)
        return cls._pack_quantized(storage, gate, up, down, _core.Pool(threads))

    @classmethod
    def _pack_quantized(cls, storage: str, gate, up, down, pool: _core.Pool, **variant) -> "ExpertWeights":
        E, H, I = quant.infer_dims(storage, gate, up, down)
        g = quant.check_projection(storage, gate, "gate", E, I, H)
        u = quant.check_projection(storage, up, "up", E, I, H)
        d = quant.check_projection(storage, down, "down", E, H, I)
        scale_dtypes = {g[1].dtype, u[1].dtype, d[1].dtype}
        if storage == "int4_group" and len(scale_dtypes) > 1:  # one scale type per packed state
            g, u, d = ((c, s.float()) for c, s in (g, u, d))
        scale_type = quant.SCALE_TYPE_CODE.get(g[1].dtype, 0)
        packed = _core.pack_quantized(E, H, I, quant.STORAGE_CODE[storage], scale_type,
                                      tuple(t.data_ptr() for t in g), tuple(t.data_ptr() for t in u),
                                      tuple(t.data_ptr() for t in d), pool)
        return cls(packed, E, H, I, **variant)


def _unpickle_expert_weights(gate, up, down, backward_weights: str, partitions: int = 1, numa: bool = False,
                             variant: ExpertVariant = SWIGLU, gate_bias=None, up_bias=None,
                             down_bias=None) -> ExpertWeights:
    return ExpertWeights.from_tensors(gate, up, down, backward_weights=backward_weights, partitions=partitions,
                                      numa=numa, variant=variant, gate_bias=gate_bias, up_bias=up_bias,
                                      down_bias=down_bias)


# Version of the packed bytes a quantized storage pickles (kernels.hpp, QuantPanels): 3 puts the 4-bit
# formats' scales in chunks between their codes (2: all after the codes; 1: a pair-row's 16 bytes in a row
# instead of 4 pair-rows to a 64-byte block; pickles without a version).
PACKED_LAYOUT = 3


def _unpickle_quantized(E: int, H: int, I: int, storage: int, scale_type: int, gate_up: bytes, down: bytes,
                        variant: ExpertVariant = SWIGLU, gate_bias=None, up_bias=None, down_bias=None,
                        layout: int = 1) -> ExpertWeights:
    if layout != PACKED_LAYOUT and quant.STORAGES[storage] in ("int4_group", "mxfp4"):
        raise ValueError(f"pickled {quant.STORAGES[storage]} ExpertWeights: packed layout {layout} of an earlier "
                         f"kt_functional, this one reads layout {PACKED_LAYOUT}; make them again from the checkpoint "
                         "(ExpertWeights.from_quantized) or the float weights")
    return ExpertWeights(_core.restore_quantized(E, H, I, storage, scale_type, gate_up, down), E, H, I,
                         variant=variant, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias)


def _unpickle_quantized_parts(E: int, H: int, I: int, parts: tuple, part_cpus: tuple, numa: bool,
                              variant: ExpertVariant = SWIGLU, gate_bias=None, up_bias=None,
                              down_bias=None) -> ExpertWeights:
    return ExpertWeights(None, E, H, I, "on_the_fly", parts, part_cpus, numa, variant=variant, gate_bias=gate_bias,
                         up_bias=up_bias, down_bias=down_bias)


_LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")
# The axis of each LoRA tensor along I: a partition takes its slice there; None: shared by every partition
# (its gradient is the sum of the partitions').
PARTITION_AXIS = {"gate_a": None, "gate_b": 1, "up_a": None, "up_b": 1, "down_a": 2, "down_b": None}


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


def numa_nodes() -> list[tuple[int, ...]]:
    """The CPUs of each NUMA node this process may run on (from /sys/devices/system/node); one entry holding
    every allowed CPU where Linux reports no nodes."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    nodes = []
    for path in sorted(glob.glob("/sys/devices/system/node/node[0-9]*/cpulist"),
                       key=lambda p: int(p.split("/node")[-1].split("/")[0])):
        with open(path) as f:
            cpus = set()
            for part in f.read().strip().split(","):
                if part:
                    lo, _, hi = part.partition("-")
                    cpus.update(range(int(lo), int(hi or lo) + 1))
        if cpus & allowed:
            nodes.append(tuple(sorted(cpus & allowed)))
    return nodes or [tuple(sorted(allowed))]


def _split(n: int, parts: int, align: int = 32) -> list[tuple[int, int]]:
    """[lo, hi) ranges of n split into parts near-equal pieces, on multiples of align where n allows."""
    unit = align if n >= align * parts else 1
    units = -(-n // unit)
    bounds = [min(n, unit * (units * p // parts)) for p in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _split_threads(threads: int, n: int) -> tuple[int, ...]:
    return tuple(threads // n + (p < threads % n) or 1 for p in range(n))


def _partition_pools(threads: tuple[int, ...], cpus: tuple[tuple[int, ...], ...]) -> list[_core.Pool]:
    # slot p + 1: pools of their own, running at the same time (slot 0 is the unpartitioned states')
    return [_core.Pool(t, p + 1, c) for p, (t, c) in enumerate(zip(threads, cpus))]


@dataclass(frozen=True)
class _PartitionPlan:
    """How a layer splits: I ranges, each partition's CPUs (() = not pinned) and thread count."""

    ranges: tuple[tuple[int, int], ...]
    cpus: tuple[tuple[int, ...], ...]
    threads: tuple[int, ...]


def _check_partition_args(partitions, numa) -> None:
    if not isinstance(numa, bool):
        raise TypeError(f"numa: expected a bool, got {numa!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions: expected an int >= 1, got {partitions!r}")


def _partition_plan(I: int, threads: int, partitions: int, numa: bool) -> _PartitionPlan | None:
    """The split of partitions=N / numa=True; None for one partition."""
    _check_partition_args(partitions, numa)
    nodes = numa_nodes() if numa else []
    n = len(nodes) if numa and partitions == 1 else partitions
    if numa and n != len(nodes):
        raise ValueError(f"partitions: numa=True makes one partition per NUMA node ({len(nodes)} here), "
                         f"got partitions={partitions}")
    if n > I:
        raise ValueError(f"partitions: at most I = {I} partitions, got {n}")
    if n == 1:
        return None
    # Pinned only where there are several nodes: on one node every partition may use every CPU.
    cpus = tuple(nodes) if len(nodes) > 1 else ((),) * n
    return _PartitionPlan(tuple(_split(I, n)), cpus, _split_threads(threads, n))


# weights -> {(partitions, numa): the same weights partitioned}: states that partition unpartitioned weights
# (and those made from them by dataclasses.replace, e.g. the torch adapter's per-call states) pack them once.
_REPARTITIONED: "weakref.WeakKeyDictionary[ExpertWeights, dict]" = weakref.WeakKeyDictionary()


def _repartitioned(weights: ExpertWeights, threads: int, partitions: int, numa: bool) -> ExpertWeights:
    cached = _REPARTITIONED.setdefault(weights, {})
    if (partitions, numa) not in cached:
        gate, up, down = weights.dequantize()  # exact bf16 values; one layer in fp32 while packing
        cached[(partitions, numa)] = ExpertWeights.from_tensors(
            gate if weights.variant.gated else None, up, down, threads=threads,
            backward_weights=weights.backward_weights, partitions=partitions, numa=numa, variant=weights.variant,
            gate_bias=weights.gate_bias, up_bias=weights.up_bias, down_bias=weights.down_bias)
    return cached[(partitions, numa)]


@dataclass(frozen=True, eq=False)
class MoEState:
    """Everything a call needs: packed weights, optional LoRA, thread count and ISA path.

    Workers come from a pool shared by all states with the same thread count.

    Partitioned weights (ExpertWeights.from_tensors(..., partitions=N or numa=True)) make a partitioned
    state: every expert's intermediate dimension I is split into N slices, each with its own worker pool
    (threads split between them, pinned to the node's CPUs with numa=True where there are several nodes)
    and its own packed slice, packed (first touched) by that partition's workers; a call runs the
    partitions at once and sums their partial results in a fixed order (deterministic).
    MoEState(unpartitioned weights, partitions=N or numa=True) partitions a copy of them (packed once per
    weights and shared): the layer then holds its experts twice.
    """

    weights: ExpertWeights
    lora: LoRA | None = None
    threads: int = 2
    isa: str | None = None
    partitions: int = 1
    numa: bool = False
    _pool: _core.Pool | None = field(default=None, repr=False)  # given only to the states of partitions
    _token: object = field(init=False, repr=False)  # identifies this state's caches
    _parts: tuple = field(init=False, repr=False)  # one LoRA-less state per partition; () when unpartitioned

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
        object.__setattr__(self, "_token", object())
        object.__setattr__(self, "_parts", self._partition())
        if self._pool is None and not self._parts:
            object.__setattr__(self, "_pool", _core.Pool(self.threads))

    def _partition(self) -> tuple:
        _check_partition_args(self.partitions, self.numa)
        weights = self.weights
        if weights.parts:
            if self.partitions not in (1, weights.partitions) or (self.numa and not weights.numa):
                raise ValueError(f"partitions: the weights are packed in {weights.partitions} partitions "
                                 f"(numa={weights.numa}); got partitions={self.partitions}, numa={self.numa}")
        elif _partition_plan(weights.intermediate_size, self.threads, self.partitions, self.numa) is None:
            return ()
        else:
            weights = _repartitioned(weights, self.threads, self.partitions, self.numa)
        pools = _partition_pools(_split_threads(self.threads, weights.partitions), weights.part_cpus)
        # LoRA-less: a call slices the state's LoRA for each partition as the tensors are then.
        return tuple(MoEState(part, None, threads=pool.threads, isa=self.isa, _pool=pool)
                     for part, pool in zip(weights.parts, pools))

    def __reduce__(self):  # the pool and cache token are per process and per state: made anew
        return MoEState, (self.weights, self.lora, self.threads, self.isa, self.partitions, self.numa)

    def calls(self) -> list[tuple["MoEState", tuple | None, list[torch.Tensor]]]:
        """What a call runs, per partition (or the state alone): (state, pointers of its LoRA as the tensors
        are now, checked again, or None; the tensors to keep alive meanwhile). A partition gets slices of the
        LoRA along I (PARTITION_AXIS), taken at every call: optimizer steps and replaced storages show."""
        if self.lora is None:
            return [(part, None, []) for part in self.partition_states()]
        tensors = self.lora.checked_tensors()
        if not self._parts:
            return [(self, *self._lora_args(tensors))]
        out, lo = [], 0
        for part in self._parts:
            hi = lo + part.weights.intermediate_size
            sliced = [t if PARTITION_AXIS[name] is None else t.narrow(PARTITION_AXIS[name], lo, hi - lo)
                      for name, t in zip(_LORA_NAMES, tensors)]
            out.append((part, *self._lora_args(sliced)))
            lo = hi
        return out

    def partition_states(self) -> tuple["MoEState", ...]:
        """The LoRA-less states of the partitions, or (self,) for an unpartitioned state."""
        return self._parts or (self,)

    def _lora_args(self, tensors: list[torch.Tensor]) -> tuple[tuple, list[torch.Tensor]]:
        ts = [t.detach().contiguous() for t in tensors]
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


__all__ = ["ExpertVariant", "ExpertWeights", "LoRA", "MoEState", "numa_nodes", "ACTIVATIONS"]
