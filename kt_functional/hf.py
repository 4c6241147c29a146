"""Hugging Face integration: move a transformers MoE model's routed experts into kt-functional.

patch_model(model) swaps every MoE block's routed experts for a KTExperts (packed frozen weights
in CPU memory + trainable LoRA on every expert); routers, shared experts, norms and attention stay
torch. load_experts streams a safetensors checkpoint into packed weights layer by layer.
save_adapter / load_adapter speak PEFT's format for the unpatched model (LoRA on the v5 fused
expert parameters through `target_parameters`), so the adapter loads in PEFT. A patched model still
behaves like a transformers model: its state_dict() names the base experts as transformers does
(dequantized from the packed state), save_pretrained writes a checkpoint from_pretrained loads (plus
the LoRA as a PEFT adapter), it deep-copies and pickles, and unpatch_model gives the torch experts back.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import distributed, quant
from .state import _LORA_NAMES, ExpertVariant, ExpertWeights, check_lora_options, resolve_threads
from .torch import KTExperts

EXPERTS_IMPLEMENTATION = "kt_functional"

# Checkpoint keys: v5 fused (`...experts.gate_up_proj`) or one Linear per expert and projection.
_LAYER = r"(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?experts)\."
# Quantized checkpoints add parts: gpt-oss' mxfp4 `gate_up_proj_blocks` / `_scales`; DeepSeek-V3's fp8
# `weight` + `weight_scale_inv`; compressed-tensors' `weight_packed` / `weight_scale` / `weight_shape`.
_FUSED_KEY = re.compile(_LAYER + r"(?P<proj>gate_up_proj|down_proj)(?P<part>_blocks|_scales)?$")
_PER_EXPERT_KEY = re.compile(_LAYER + r"(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\."
                             r"(?P<part>weight|weight_scale_inv|weight_packed|weight_scale|weight_shape)$")
_PER_EXPERT_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_LAYER_OF_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _is_experts(module: nn.Module) -> bool:
    """A routed-experts module: one decorated with transformers' @use_experts_implementation (it declares the
    interface's properties), or without that interface (older transformers v5) one holding 3-D gate_up_proj and
    down_proj parameters."""
    if _has_experts_interface():  # not one patch_model moved already
        return hasattr(module, "_is_expert_parallel") and hasattr(module, "has_gate") and not hasattr(module,
                                                                                                      "kt_experts")
    params = getattr(module, "_parameters", {})
    return "gate_up_proj" in params and "down_proj" in params and params["gate_up_proj"].dim() == 3


def _experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    found = [(name, module) for name, module in model.named_modules() if _is_experts(module)]
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no routed-experts module (one using transformers' "
                         "experts interface); was it patched already?")
    return found


# ---- What an experts module computes, read from the experts interface's properties ----------------------------
#
# transformers' @use_experts_implementation declares has_gate, has_bias, is_transposed, is_concatenated and
# has_post_expert_norm on the module; the activation is the module's act_fn, and a few classes define their own
# _apply_gate. Support is decided from these alone (never from model_type or config fields): act_fn and a custom
# _apply_gate are recognized by evaluating them on probe values against the variants the kernels implement.

_PROPERTIES = {  # property -> (the decorator's default, values kt-functional supports)
    "has_gate": (True, (True, False)),
    "has_bias": (False, (True, False)),
    "is_transposed": (False, (True, False)),
    "is_concatenated": (True, (True, False)),
    "has_post_expert_norm": (False, (False,)),
}
_ACTIVATION_NAMES = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "relu2")


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores its weights (the interface's properties): gate_up_proj [E, 2I, H] (or
    [E, H, 2I] when transposed) with gate and up concatenated or interleaved, or up_proj [E, I, H] without a
    gate; down_proj [E, H, I] (or [E, I, H]); biases gate_up_proj_bias [E, 2I] / up_proj_bias, down_proj_bias."""

    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        first = "gate_up_proj" if self.has_gate else "up_proj"
        return (first, "down_proj") + ((f"{first}_bias", "down_proj_bias") if self.has_bias else ())

    def split(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The module's parameters -> views gate, up [E, I, H], down [E, H, I], biases gate [E, I], up, down."""
        first, down = params[self.names[0]], params["down_proj"]
        if self.is_transposed:
            first, down = first.transpose(1, 2), down.transpose(1, 2)
        out = {"gate": None, "gate_bias": None, "up_bias": None, "down_bias": None, "down": down}
        bias = params.get(self.names[0] + "_bias") if self.has_bias else None
        if not self.has_gate:
            out["up"], out["up_bias"] = first, bias
        else:
            I = first.shape[1] // 2
            gate, up = (first[:, :I], first[:, I:]) if self.is_concatenated else (first[:, ::2], first[:, 1::2])
            out["gate"], out["up"] = gate, up
            if bias is not None:
                out["gate_bias"], out["up_bias"] = (bias[:, :I], bias[:, I:]) if self.is_concatenated else (
                    bias[:, ::2], bias[:, 1::2])
        if self.has_bias:
            out["down_bias"] = params["down_proj_bias"]
        return out

    def gate_up_columns(self, I: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of the gate and of the up values in the module's [S, 2I] gate_up output."""
        i = torch.arange(I)
        return (i, I + i) if self.is_concatenated else (2 * i, 2 * i + 1)

    def join(self, t: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """split's inverse: tensors in our shapes -> the module's parameters (new contiguous tensors)."""
        down = t["down"].transpose(1, 2) if self.is_transposed else t["down"]
        out = {"down_proj": down.contiguous()}
        if self.has_gate:
            E, I, H = t["up"].shape
            first = t["up"].new_empty(E, 2 * I, H)
            cols_g, cols_u = self.gate_up_columns(I)
            first[:, cols_g], first[:, cols_u] = t["gate"], t["up"]
        else:
            first = t["up"]
        out[self.names[0]] = (first.transpose(1, 2) if self.is_transposed else first).contiguous()
        if self.has_bias:
            if self.has_gate:
                E, I = t["up_bias"].shape
                bias = t["up_bias"].new_empty(E, 2 * I)
                cols_g, cols_u = self.gate_up_columns(I)
                bias[:, cols_g], bias[:, cols_u] = t["gate_bias"], t["up_bias"]
            else:
                bias = t["up_bias"]
            out[self.names[2]], out["down_proj_bias"] = bias.contiguous(), t["down_bias"].contiguous()
        return out


def _check_property(name: str, module: nn.Module, prop: str) -> None:
    default, supported = _PROPERTIES[prop]
    value = getattr(module, prop, default)
    if value not in supported:
        raise ValueError(f"model: experts module {name} ({type(module).__name__}) has {prop}={value!r}; "
                         f"kt-functional supports {prop} in {list(supported)}")


def _probe(n: int, spread: float, seed: int = 0) -> torch.Tensor:
    """n fp32 probe values over [-spread, spread], 0 and small values included."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.rand(n, generator=gen) * 2 - 1) * spread
    z[: n // 8] *= 0.05
    z[0] = 0.0
    return z


def _same(out, expected) -> bool:
    return (isinstance(out, torch.Tensor) and out.shape == expected.shape
            and bool(torch.all((out.float() - expected).abs() <= 1e-5 * (1.0 + expected.abs()))))


def _activation_of(act_fn) -> str | None:
    """The name of the kernels' activation that act_fn computes (within fp32 rounding), or None."""
    from .reference import _ACTIVATIONS

    if act_fn is None:
        return None
    z = _probe(4096, 8.0)
    with torch.no_grad():
        try:
            out = act_fn(z.clone())
        except Exception:  # e.g. a two-argument activation module: not a plain activation
            return None
    for name in _ACTIVATION_NAMES:
        if _same(out, _ACTIVATIONS[name](z, None)):
            return name
    return None


def _numbers(module: nn.Module) -> list[float]:
    """The module's own positive finite scalar attributes (a custom _apply_gate's limits and slopes live there)."""
    return sorted({float(v) for k, v in vars(module).items() if not k.startswith("_") and not isinstance(v, bool)
                   and isinstance(v, (int, float)) and math.isfinite(v) and v > 0})


def _gate_candidates(module: nn.Module, activation: str | None) -> Iterator[ExpertVariant]:
    """Gated variants a custom _apply_gate may compute: its act_fn (or silu) with or without clamps at one of
    the module's numbers, and gpt-oss's swish with alpha and limit among them and (u + 1)."""
    numbers = _numbers(module)
    for act in dict.fromkeys([activation or "silu", "silu"]):
        yield ExpertVariant(activation=act)
        for limit in numbers:
            yield ExpertVariant(activation=act, limit=limit)
    for alpha in numbers:
        for limit in [None, *numbers]:
            for offset in (0.0, 1.0):
                yield ExpertVariant(activation="swish", alpha=alpha, limit=limit, up_offset=offset)


def _gated_variant(module: nn.Module, layout: ExpertsLayout, activation: str | None) -> ExpertVariant | None:
    """The kernels' variant equal to the module's _apply_gate on probe values (gate / up placed as its
    layout says), or None."""
    from .reference import _hidden

    I = 256
    spreads = [4.0, *(2.0 * v for v in _numbers(module))]  # around 0 and beyond each clamp the module may have
    g = torch.stack([_probe(I, v, seed=1) for v in spreads])
    u = torch.stack([_probe(I, v, seed=2) for v in spreads])
    gate_up = torch.empty(len(spreads), 2 * I)
    cols_g, cols_u = layout.gate_up_columns(I)
    gate_up[:, cols_g], gate_up[:, cols_u] = g, u
    with torch.no_grad():
        try:
            out = module._apply_gate(gate_up)
        except Exception:
            return None
        for variant in _gate_candidates(module, activation):
            if _same(out, _hidden(g, u, variant)):
                return variant
    return None


class ModuleGate:
    """The split path's gate function of an experts module: its own _apply_gate on g | u placed as its layout
    says (or its act_fn on u when it has no gate), in torch under autograd."""

    def __init__(self, module: nn.Module, layout: ExpertsLayout):
        self.module, self.layout = module, layout

    def __call__(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not self.layout.has_gate:
            return self.module.act_fn(u)
        shape, I = g.shape, g.shape[-1]
        pair = (torch.cat([g, u], dim=-1) if self.layout.is_concatenated
                else torch.stack([g, u], dim=-1).flatten(-2))
        return self.module._apply_gate(pair.reshape(-1, 2 * I)).reshape(shape)

    def __repr__(self) -> str:
        what = "_apply_gate" if self.layout.has_gate else "act_fn"
        return f"{type(self.module).__name__}.{what} (torch)"


def experts_support(name: str, module: nn.Module) -> tuple[ExpertsLayout, ExpertVariant | None]:
    """(storage layout, variant) of an experts module, from its properties; variant None: the kernels' epilogues
    do not compute its gate function, which then runs in torch between two kernel calls (the split path).
    ValueError naming the module, the property and the supported values when the kernels cannot run it."""
    for prop in _PROPERTIES:
        _check_property(name, module, prop)
    layout = ExpertsLayout(*(bool(getattr(module, p, _PROPERTIES[p][0]))
                             for p in ("has_gate", "has_bias", "is_transposed", "is_concatenated")))
    params = dict(module.named_parameters(recurse=False))
    missing = [n for n in layout.names if n not in params]
    if missing:
        raise ValueError(f"model: experts module {name} ({type(module).__name__}) declares has_gate="
                         f"{layout.has_gate}, has_bias={layout.has_bias} but has no parameter {missing[0]}")
    act_fn = getattr(module, "act_fn", None)
    activation = _activation_of(act_fn)
    apply_gate = getattr(module, "_apply_gate", None)
    custom_gate = getattr(apply_gate, "__func__", apply_gate) not in (None, _default_apply_gate())
    if not layout.has_gate:
        return layout, None if activation is None else ExpertVariant(gated=False, activation=activation)
    if not custom_gate:
        return layout, None if activation is None else ExpertVariant(activation=activation)
    return layout, _gated_variant(module, layout, activation)


def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:
        return None
    return default


def _layer_index(name: str) -> int:
    m = _LAYER_OF_MODULE.search(name)
    if m is None:
        raise ValueError(f"model: cannot tell the layer index of experts module '{name}'")
    return int(m.group(1))


def _has_experts_interface() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: F401
    except ImportError:
        return False
    return True


def _kt_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts interface entry: the experts module holds its KTExperts as `kt_experts`."""
    kt = getattr(self, "kt_experts", None)
    if kt is None:
        raise RuntimeError(f"experts_implementation='{EXPERTS_IMPLEMENTATION}' needs kt_functional.hf.patch_model "
                           "to have moved this module's experts into kt-functional")
    return kt(hidden_states, top_k_index, top_k_weights)


def _register_experts_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _kt_experts_forward)


def _uses_experts_interface(module: nn.Module) -> bool:
    """True for experts classes decorated with transformers' @use_experts_implementation."""
    return _has_experts_interface() and hasattr(module, "_is_expert_parallel") and hasattr(module, "config")


def kt_layers(model: nn.Module) -> list[tuple[str, KTExperts]]:
    """(path of the experts module in the unpatched model, its KTExperts) for every patched layer."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, KTExperts):
            out.append((name.removesuffix(".kt_experts"), module))
    return out


class _TorchTwinExperts(nn.Module):
    """An unpatched experts module carrying a patched layer's LoRA, in plain torch (per-expert loop): the base
    projections from the module's own parameters in its own layout (transposed, interleaved, biases), the
    LoRA terms added at the gate / up columns the layout names, then the module's own _apply_gate (or act_fn
    when it has no gate) and post_expert_norm. bf16_inputs: hidden_states rounded to bf16 first, as the
    kernels take them (MATH.md: x is bf16, and the reference upcasts the same bf16 inputs)."""

    def __init__(self, experts: nn.Module, lora: dict, alpha: float, layout: ExpertsLayout, bf16_inputs: bool):
        super().__init__()
        self.experts = experts
        self.layout = layout
        self.bf16_inputs = bf16_inputs
        for name in _LORA_NAMES:
            setattr(self, name, nn.Parameter(lora[name].detach().clone()))
        self.scale = alpha / self.gate_a.shape[1]

    def _linear(self, x, weight, bias):
        out = x @ weight.to(x.dtype) if self.layout.is_transposed else torch.nn.functional.linear(x, weight.to(x.dtype))
        return out if bias is None else out + bias.to(x.dtype)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        m, layout, s = self.experts, self.layout, self.scale
        first_name = layout.names[0]
        first, down = getattr(m, first_name), m.down_proj
        first_bias = getattr(m, first_name + "_bias") if layout.has_bias else None
        down_bias = m.down_proj_bias if layout.has_bias else None
        E, I = self.up_b.shape[:2]
        cols_g, cols_u = layout.gate_up_columns(I)
        x = hidden_states.bfloat16().to(hidden_states.dtype) if self.bf16_inputs else hidden_states
        lora = {n: getattr(self, n).to(x.dtype) for n in _LORA_NAMES}
        y = torch.zeros_like(x).index_add(0, torch.zeros(0, dtype=torch.int64), x[:0])  # keeps x's graph
        for e in torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < E)]).tolist():
            tok, slot = torch.where(top_k_index == e)
            xe = x[tok]
            proj = self._linear(xe, first[e], None if first_bias is None else first_bias[e])
            du = s * (xe @ lora["up_a"][e].T) @ lora["up_b"][e].T
            if layout.has_gate:
                dg = s * (xe @ lora["gate_a"][e].T) @ lora["gate_b"][e].T
                proj = proj + xe.new_zeros(len(tok), 2 * I).index_copy(1, cols_g, dg).index_copy(1, cols_u, du)
                h = m._apply_gate(proj)
            else:
                h = m.act_fn(proj + du)
            o = self._linear(h, down[e], None if down_bias is None else down_bias[e])
            o = o + s * (h @ lora["down_a"][e].T) @ lora["down_b"][e].T
            if getattr(m, "has_post_expert_norm", False):
                o = m.post_expert_norm(o)
            y = y.index_add(0, tok, (o * top_k_weights[tok, slot, None].to(o.dtype)).to(y.dtype))
        return y


def torch_lora_twin(base: nn.Module, patched: nn.Module, impl: str = "eager", bf16_inputs: bool = False) -> nn.Module:
    """A copy of the unpatched base whose experts carry patched's LoRA in plain torch.

    The peer and reference of a patched model: same frozen weights, same LoRA values (copied),
    only the LoRA trainable. impl: "eager" (per-expert loop, the module's own gate function and layout;
    bf16_inputs: the experts' inputs rounded to bf16 as the kernels take them) or "grouped_mm"
    (transformers' grouped layout; SwiGLU experts in the standard layout only).
    """
    from .reference import TorchLoRAExperts

    if impl not in ("eager", "grouped_mm"):
        raise ValueError(f"impl: expected 'eager' or 'grouped_mm', got {impl!r}")
    twin = copy.deepcopy(base)
    twin.requires_grad_(False)
    for path, kt in kt_layers(patched):
        experts = twin.get_submodule(path)
        lora = {name: getattr(kt, name) for name in _LORA_NAMES}
        layout = _layout_of(kt)
        if impl == "grouped_mm":
            if (layout, kt.weights.variant, kt.gate_fn) != (ExpertsLayout(), ExpertVariant(), None):
                raise ValueError(f"impl: 'grouped_mm' twins SwiGLU experts in the standard layout; {path} computes "
                                 f"{kt.weights.variant} with {layout}")
            replacement = TorchLoRAExperts(experts.gate_up_proj, experts.down_proj, lora, kt.lora_alpha, impl=impl)
        else:
            replacement = _TorchTwinExperts(experts, lora, kt.lora_alpha, layout, bf16_inputs)
        parent, _, child = path.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, replacement)
    return twin


def patch_model(model: nn.Module, lora_rank: int = 16, lora_alpha: float = 32, threads: int | None = None, *,
                checkpoint: str | os.PathLike | None = None, storage: str | None = None,
                lora_dtype: torch.dtype = torch.float32, isa: str | None = None, freeze_base: bool = True,
                seed: int = 0, partitions: int = 1, numa: bool = False, owner_rank: int | None = None,
                lora_grad_reduction: str = "sum", timeout: datetime.timedelta | None = None) -> nn.Module:
    """Moves the routed experts of every MoE block into kt-functional; returns the model.

    The torch expert weights are packed and then freed. With checkpoint=, the packed weights are
    read from that safetensors checkpoint instead, in the checkpoint's own storage format (the model's
    own expert weights may then be empty, e.g. on the meta device). storage= ("int8", "fp8_block",
    "int4_group", "mxfp4") quantizes bf16 expert weights as they are packed (the model's, or a bf16
    checkpoint's); None keeps them as they are. lora_rank=None patches without LoRA. freeze_base=True
    leaves only the LoRA parameters trainable (set requires_grad on a router to train it too).
    partitions / numa: pack every layer's experts in partitions / per NUMA node (ExpertWeights.from_tensors).

    owner_rank=r with torch.distributed initialised with more than one rank (collective: every rank
    calls it): rank r alone holds the packed experts and their LoRA; every rank's MoE blocks send
    their tokens to it (kt_functional.distributed). The owner's LoRA gradients cover every rank's
    tokens: summed (lora_grad_reduction="sum") or divided by the number of ranks ("mean", as DDP
    averages the other gradients). timeout: how long a rank waits for the others (default: the
    default process group's). Without torch.distributed (or with one rank) owner_rank changes nothing.
    """
    if storage is not None:
        quant.check_storage(storage)
    experts = _experts_modules(model)
    support = {name: experts_support(name, module) for name, module in experts}
    if checkpoint is not None:
        for name, (layout, variant) in support.items():
            if (layout, variant) != (ExpertsLayout(), ExpertVariant()):
                raise ValueError(f"checkpoint: {name} computes {variant} stored as {layout}; streaming from a "
                                 "checkpoint (load_experts) reads SwiGLU experts in the standard layout only")
    threads = resolve_threads(threads)
    check_lora_options(lora_rank, lora_alpha)
    distributed.check_lora_grad_reduction(lora_grad_reduction)
    if owner_rank is not None and (isinstance(owner_rank, bool) or not isinstance(owner_rank, int) or owner_rank < 0):
        raise TypeError(f"owner_rank: expected a rank (an int >= 0) or None, got {owner_rank!r}")
    group = None
    if owner_rank is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        group = distributed.ExpertGroup.new(owner_rank, timeout=timeout)
    remote = group is not None and not group.is_owner
    split = [name for name, (_, variant) in support.items() if variant is None]
    if group is not None and split:
        raise ValueError(f"owner_rank: {split[0]} runs its own gate function in torch (the split path), which "
                         "runs in one process only; patch without owner_rank")
    if checkpoint is not None and not remote:
        packed = dict(load_experts(checkpoint, threads=threads, storage=storage, partitions=partitions,
                                   numa=numa))
        wanted = {_layer_index(name) for name, _ in experts}
        missing = sorted(wanted - packed.keys())
        if missing:
            raise ValueError(f"checkpoint: no routed-expert weights for layers {missing} in {os.fspath(checkpoint)}")
    use_interface = all(_uses_experts_interface(module) for _, module in experts)
    if use_interface:
        _register_experts_implementation()
        previous = {id(module.config): module.config._experts_implementation for _, module in experts}
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in experts:
        layer = _layer_index(name)
        layout, variant = support[name]
        params = {n: getattr(module, n) for n in layout.names}
        up = layout.split(params)["up"]
        expected = (up.shape[0], up.shape[2], up.shape[1])
        if remote:
            weights = None
        elif checkpoint is not None:
            weights = packed.pop(layer)
        else:
            if any(p.is_meta for p in params.values()):
                raise ValueError(f"model: {name} holds empty (meta) expert weights; pass checkpoint= to read them")
            kernel_variant = variant or ExpertVariant(gated=layout.has_gate)  # split path: no epilogue runs
            weights = _pack(layout.split(params), kernel_variant, threads, partitions, numa, storage=storage or "bf16")
        if weights is not None:
            dims = (weights.num_experts, weights.hidden_size, weights.intermediate_size)
            if dims != expected:
                raise ValueError(f"checkpoint: layer {layer} experts have (E, H, I) = {dims}, the model expects "
                                 f"{expected}")
        kt_args = (weights, lora_rank, lora_alpha, threads)
        kt_kwargs = dict(isa=isa, lora_dtype=lora_dtype, seed=seed + layer)
        if group is None:
            kt = KTExperts(*kt_args, **kt_kwargs)
        elif remote:
            kt = distributed.RemoteExperts(group, *expected)
        else:
            kt = distributed.OwnerExperts(group, *kt_args, lora_grad_reduction=lora_grad_reduction, **kt_kwargs)
        kt.peft_param_order = [p for p in module._parameters if p in layout.names[:2]]
        kt.experts_layout = layout
        if variant is None:
            kt.gate_fn = ModuleGate(module, layout)
        if use_interface:
            for n in layout.names:  # frees the torch expert weights
                delattr(module, n)
            module.kt_experts = kt
            module._kt_previous_experts_implementation = previous[id(module.config)]
            module.config._experts_implementation = EXPERTS_IMPLEMENTATION
            module.register_forward_pre_hook(_check_experts_implementation)
            holder = module
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, kt)
            holder = kt
        if not remote:  # a non-owner rank has no base weights to save or load
            holder.register_state_dict_post_hook(_experts_state_dict_hook)
            holder.register_load_state_dict_pre_hook(_experts_load_state_dict_hook)
    if group is not None and group.is_owner:
        # The LoRA lives on the owner only: DDP over the other parameters must not wait for it.
        from torch.nn.parallel import DistributedDataParallel
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, distributed.OwnerExperts)
                    for p, _ in m.named_parameters(recurse=False)])
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = _SavePretrained(model)
    return model


# ---- A patched model as a transformers model: state_dict, save_pretrained, implementations, unpatch_model ------
#
# The hooks and the save_pretrained override are module-level functions / a class, so a patched model
# deep-copies and pickles with them.

ADAPTER_SUBDIR = "kt_lora_adapter"  # where save_pretrained writes the LoRA (a PEFT adapter)


def _kt_of(module: nn.Module) -> KTExperts:
    """The KTExperts of a patched experts module (or the module itself where it replaced the experts module)."""
    return module if isinstance(module, KTExperts) else module.kt_experts


def _pack(tensors: dict, variant: ExpertVariant, threads: int | None, partitions: int = 1,
          numa: bool = False, storage: str = "bf16") -> ExpertWeights:
    """ExpertWeights from ExpertsLayout.split's views (strided: packed straight from the module's storage)."""
    return ExpertWeights.from_tensors(tensors["gate"], tensors["up"], tensors["down"], storage=storage,
                                      threads=threads, partitions=partitions, numa=numa, variant=variant,
                                      gate_bias=tensors["gate_bias"], up_bias=tensors["up_bias"],
                                      down_bias=tensors["down_bias"])


def _layout_of(kt: KTExperts) -> ExpertsLayout:
    return getattr(kt, "experts_layout", None) or ExpertsLayout()


def _base_tensors(kt: KTExperts, merge_lora: bool = False) -> dict[str, torch.Tensor]:
    """The experts module's parameters (its names and layout) in fp32 from the packed weights (exact bf16
    values) and biases, with s B A added per expert and projection if merge_lora."""
    gate, up, down = kt.weights.dequantize()
    if merge_lora and kt.lora_rank:
        s = kt.lora_alpha / kt.lora_rank
        ga, gb, ua, ub, da, db = (getattr(kt, n).detach().float() for n in _LORA_NAMES)
        gate.baddbmm_(gb, ga, alpha=s)
        up.baddbmm_(ub, ua, alpha=s)
        down.baddbmm_(db, da, alpha=s)
    w = kt.weights
    return _layout_of(kt).join({"gate": gate, "up": up, "down": down, "gate_bias": w.gate_bias,
                                "up_bias": w.up_bias, "down_bias": w.down_bias})


def _experts_state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    """state_dict() of a patched experts module also holds its base weights under transformers' names, in bf16
    (what the kernels hold; biases fp32): save_pretrained and any state_dict-based save write the real experts."""
    kt = _kt_of(module)
    tensors = _base_tensors(kt)
    for name in _layout_of(kt).names:
        state_dict[prefix + name] = tensors[name] if name.endswith("_bias") else tensors[name].bfloat16()


def _experts_load_state_dict_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs) -> None:
    """load_state_dict() of a patched experts module packs base weights found under transformers' names."""
    kt = _kt_of(module)
    names = _layout_of(kt).names
    found = {name: state_dict.pop(prefix + name) for name in names if prefix + name in state_dict}
    if not found:  # a state dict with the LoRA alone
        return
    if len(found) < len(names):
        raise ValueError(f"state_dict: {prefix}{next(iter(found))} without {prefix}"
                         f"{next(n for n in names if n not in found)}; the experts need {list(names)}")
    kt.set_weights(_pack(_layout_of(kt).split(found), kt.weights.variant, kt._state.threads, kt.weights.partitions,
                         kt.weights.numa, storage=kt.weights.storage))


def _check_experts_implementation(module, args) -> None:
    """Forward pre-hook: a patched experts module has no torch weights for another implementation to use."""
    impl = module.config._experts_implementation
    if impl != EXPERTS_IMPLEMENTATION:
        raise RuntimeError(f"experts_implementation='{impl}': patch_model moved this model's experts into "
                           f"kt-functional; call kt_functional.hf.unpatch_model(model, merge_lora=...) to restore "
                           f"the torch expert weights before switching to another experts implementation")


_HOOKS = (_experts_state_dict_hook, _experts_load_state_dict_hook, _check_experts_implementation)


def _remove_hooks(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for key, hook in list(hooks.items()):
            if getattr(hook, "hook", hook) in _HOOKS:  # load hooks are stored wrapped (hook.hook)
                del hooks[key]


class _SavePretrained:
    """save_pretrained of a patched model (set on the model by patch_model).

    Writes transformers' checkpoint with the base experts dequantized from the packed state (bf16, in the
    checkpoint's original format, as the unpatched model saves them): from_pretrained loads it into the
    unpatched model. The LoRA is left out of it and written as a PEFT adapter to
    <save_directory>/kt_lora_adapter (hf.load_adapter after patch_model, or peft.PeftModel.from_pretrained on
    the unpatched model). For the adapter alone, call kt_functional.hf.save_adapter(model, directory).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        model = self.model
        group = distributed.group_of(model)
        if group is not None and not group.is_owner:
            raise RuntimeError(f"save_pretrained: rank {group.rank} does not hold the experts (rank {group.owner} "
                               "owns them): call save_pretrained on the owner rank; hf.save_adapter(model, directory) "
                               "on every rank writes the adapter")
        if state_dict is None:
            state_dict = model.state_dict()
        lora_keys = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, KTExperts)
                     for p, _ in m.named_parameters(recurse=False)}
        state_dict = {k: v for k, v in state_dict.items() if k not in lora_keys}
        if is_main_process and any(kt.lora_rank for _, kt in kt_layers(model)):
            _write_adapter(model, os.path.join(save_directory, ADAPTER_SUBDIR))  # first: push_to_hub uploads it too
        return type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                           state_dict=state_dict, **kwargs)


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the model's first floating-point parameter outside kt-functional's experts."""
    kt_params = {id(p) for _, kt in kt_layers(model) for p in kt.parameters()}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in kt_params:
            return p.dtype, p.device
    return torch.bfloat16, torch.device("cpu")


def unpatch_model(model: nn.Module, merge_lora: bool = False) -> nn.Module:
    """Undoes patch_model: gives every patched experts module its torch weights back; returns the model.

    gate_up_proj / down_proj become frozen nn.Parameters again, dequantized from the packed state (exact
    bf16 values) in the dtype and on the device of the model's other parameters; with merge_lora=True each
    expert's LoRA is merged into them (W + s B A for gate, up and down), else the LoRA is dropped. The
    kt_experts children are removed and the experts implementation goes back to what it was before
    patching (unless it was switched since), so every transformers implementation runs again.
    """
    if not isinstance(merge_lora, bool):
        raise TypeError(f"merge_lora: expected a bool, got {merge_lora!r}")
    if distributed.group_of(model) is not None:
        raise ValueError("model: it was patched with owner_rank (its experts live on one rank); unpatch_model "
                         "restores a single-process patched model only")
    layers = kt_layers(model)
    if not layers:
        raise ValueError("model: it has no kt-functional experts; nothing to unpatch")
    for path, _ in layers:
        if isinstance(model.get_submodule(path), KTExperts):
            raise ValueError(f"model: {path} was replaced by a KTExperts (transformers without the experts "
                             "interface); unpatch_model restores experts modules patched through that interface")
    dtype, device = _model_dtype_device(model)
    for path, kt in layers:
        module = model.get_submodule(path)
        tensors = _base_tensors(kt, merge_lora)
        del module.kt_experts
        _remove_hooks(module)
        for name in _layout_of(kt).names:
            setattr(module, name, nn.Parameter(tensors.pop(name).to(dtype=dtype, device=device), requires_grad=False))
        previous = module.__dict__.pop("_kt_previous_experts_implementation", None)
        if module.config._experts_implementation == EXPERTS_IMPLEMENTATION:
            module.config._experts_implementation = previous or "eager"
    model.__dict__.pop("save_pretrained", None)
    return model


def _checkpoint_files(checkpoint_dir) -> dict[str, list[str]]:
    """file -> its tensor names, from model.safetensors.index.json or the *.safetensors files."""
    from safetensors import safe_open

    root = os.fspath(checkpoint_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"checkpoint_dir: {root} is not a directory")
    index = os.path.join(root, "model.safetensors.index.json")
    files: dict[str, list[str]] = defaultdict(list)
    if os.path.exists(index):
        with open(index) as f:
            for key, file in json.load(f)["weight_map"].items():
                files[os.path.join(root, file)].append(key)
        return files
    for file in sorted(os.listdir(root)):
        if file.endswith(".safetensors") and not file.startswith("adapter_"):
            path = os.path.join(root, file)
            with safe_open(path, "pt") as f:
                files[path] = list(f.keys())
    if not files:
        raise FileNotFoundError(f"checkpoint_dir: no *.safetensors files in {root}")
    return files


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32,
                       "I64": torch.int64}


def _read_safetensors(path: str, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Reads tensors with plain file reads straight into fresh tensors (no mmap: file pages would count
    in RSS while mapped, and safetensors' mmap reader copies again)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for key in keys:
            meta = header[key]
            dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise TypeError(f"checkpoint: {key} has dtype {meta['dtype']}; kt-functional reads "
                                f"{'/'.join(_SAFETENSORS_DTYPES)} expert tensors")
            start, end = meta["data_offsets"]
            t = torch.empty(meta["shape"], dtype=dtype)
            if end - start != t.nbytes:
                raise ValueError(f"checkpoint: {key} in {path} holds {end - start} bytes, its shape needs {t.nbytes}")
            f.seek(8 + size + start)
            if f.readinto(memoryview(t.view(torch.uint8).reshape(-1).numpy())) != t.nbytes:
                raise ValueError(f"checkpoint: {path} ends inside {key}")
            yield key, t


def _checkpoint_config(checkpoint_dir) -> dict:
    path = os.path.join(os.fspath(checkpoint_dir), "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def checkpoint_storage(checkpoint_dir) -> str:
    """The storage format of a checkpoint's routed experts, from its config.json `quantization_config`:
    "bf16" (none), "fp8_block" (quant_method fp8, weight_block_size [128, 128]), "int4_group"
    (compressed-tensors pack-quantized, 4-bit symmetric int, group 32) or "mxfp4" (quant_method mxfp4)."""
    config = _checkpoint_config(checkpoint_dir)
    q = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not q:
        return "bf16"
    method = q.get("quant_method")
    if method == "fp8":
        if list(q.get("weight_block_size") or []) != [128, 128]:
            raise ValueError(f"checkpoint: fp8 with weight_block_size {q.get('weight_block_size')}; kt-functional "
                             "reads block-FP8 with weight_block_size [128, 128]")
        return "fp8_block"
    if method == "compressed-tensors":
        groups = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
        ok = q.get("format") == "pack-quantized" and groups and all(
            w.get("num_bits") == 4 and w.get("type", "int") == "int" and w.get("symmetric", False)
            and w.get("strategy") == "group" and w.get("group_size") == quant.GROUP for w in groups)
        if not ok:
            raise ValueError("checkpoint: compressed-tensors quantization_config must be pack-quantized 4-bit "
                             f"symmetric int with group_size {quant.GROUP} for kt-functional, got {q}")
        return "int4_group"
    if method == "mxfp4":
        return "mxfp4"
    raise ValueError(f"checkpoint: quantization_config quant_method {method!r} is not supported; kt-functional "
                     "reads bf16, fp8 (block 128 x 128), compressed-tensors pack-quantized int4 and mxfp4 experts")


def _split_fused(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up rows of a fused [E, 2I, ...] tensor (gpt-oss interleaves them, transformers v5 stacks them)."""
    if interleaved:
        return t[:, 0::2], t[:, 1::2]
    I = t.shape[1] // 2
    return t[:, :I], t[:, I:]


def load_experts(checkpoint_dir, *, threads: int | None = None, storage: str | None = None, partitions: int = 1,
                 numa: bool = False) -> Iterator[tuple[int, ExpertWeights]]:
    """Yields (layer index, packed ExpertWeights) for each MoE layer of a safetensors checkpoint.

    Reads one layer at a time (sharded + indexed or single file; v5 fused `gate_up_proj` /
    `down_proj` keys or per-expert `experts.N.{gate,up,down}_proj.weight` / Mixtral's w1/w3/w2),
    packs it, and drops the torch copy before the next layer: peak memory is the packed size
    plus one layer. Quantized checkpoints (checkpoint_storage: DeepSeek-V3's block-FP8 `weight` +
    `weight_scale_inv`, compressed-tensors' `weight_packed` / `weight_scale`, gpt-oss' mxfp4
    `gate_up_proj_blocks` / `_scales`) are packed in their own format, never as a bf16 copy.
    storage= quantizes a bf16 checkpoint's experts into that format as each layer is packed.
    partitions / numa: see ExpertWeights.from_tensors (bf16 checkpoints; a quantized one packs unpartitioned).
    """
    if storage is not None:
        quant.check_storage(storage)
    stored = checkpoint_storage(checkpoint_dir)
    if stored != "bf16" and storage not in (None, stored):
        raise ValueError(f"storage: the checkpoint's experts are {stored}; storage={storage!r} would quantize "
                         "them again (pass storage=None to keep the checkpoint's format)")
    if stored != "bf16" and (partitions != 1 or numa):
        raise ValueError(f"partitions: the checkpoint's {stored} experts are packed unpartitioned; got "
                         f"partitions={partitions}, numa={numa}")
    interleaved = _checkpoint_config(checkpoint_dir).get("model_type") == "gpt_oss"  # gate, up rows alternate
    layers: dict[int, dict] = defaultdict(lambda: {"fused": {}, "experts": {}})
    for file, keys in _checkpoint_files(checkpoint_dir).items():
        for key in keys:
            if m := _FUSED_KEY.match(key):
                layers[int(m["layer"])]["fused"][m["proj"] + (m["part"] or "")] = (file, key)
            elif m := _PER_EXPERT_KEY.match(key):
                proj = _PER_EXPERT_PROJ[m["proj"]]
                layers[int(m["layer"])]["experts"][(int(m["expert"]), proj, m["part"])] = (file, key)
    if not layers:
        raise ValueError(f"checkpoint_dir: no routed-expert weights found in {os.fspath(checkpoint_dir)}")
    # The parts of one projection per expert, by format; the first is its codes (or bf16 weight).
    per_expert_parts = {"bf16": ("weight",), "fp8_block": ("weight", "weight_scale_inv"),
                        "int4_group": ("weight_packed", "weight_scale"), "mxfp4": ()}[stored]

    def read(located: list[tuple[str, str]]) -> Iterator[tuple[str, torch.Tensor]]:
        by_file = defaultdict(list)
        for file, key in located:
            by_file[file].append(key)
        for file, keys in by_file.items():
            yield from _read_safetensors(file, keys)

    for layer in sorted(layers):
        fused, per_expert = layers[layer]["fused"], layers[layer]["experts"]
        if stored == "mxfp4":
            names = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
            missing = [n for n in names if n not in fused]
            if missing:
                raise ValueError(f"checkpoint: layer {layer} lacks mxfp4 expert tensors {missing}")
            t = dict(read([fused[n] for n in names]))
            blocks, scales = (_split_fused(t[fused[n][1]], interleaved) for n in names[:2])
            weights = ExpertWeights.from_quantized("mxfp4", (blocks[0], scales[0]), (blocks[1], scales[1]),
                                                   (t[fused[names[2]][1]], t[fused[names[3]][1]]), threads=threads)
        elif stored == "bf16" and {"gate_up_proj", "down_proj"} <= fused.keys():
            t = dict(read([fused["gate_up_proj"], fused["down_proj"]]))
            weights = ExpertWeights.from_fused(t[fused["gate_up_proj"][1]], t[fused["down_proj"][1]],
                                               storage=storage or "bf16", threads=threads, partitions=partitions,
                                               numa=numa)
        else:
            experts = {e for e, _, _ in per_expert}
            num_experts = 1 + max(experts, default=-1)
            missing = [(e, p, part) for e in range(num_experts) for p in ("gate", "up", "down")
                       for part in per_expert_parts if (e, p, part) not in per_expert]
            if missing or not num_experts:
                raise ValueError(f"checkpoint: layer {layer} lacks expert weights {missing[:4]} "
                                 "(expert, projection, part)")
            wanted = {k: v for k, v in per_expert.items() if k[2] in per_expert_parts}
            where = {key: k for k, (_, key) in wanted.items()}
            stacked: dict[tuple[str, str], torch.Tensor] = {}
            for key, t in read(list(wanted.values())):
                e, proj, part = where[key]
                if (proj, part) not in stacked:
                    stacked[proj, part] = torch.empty((num_experts, *t.shape), dtype=t.dtype)
                stacked[proj, part][e].copy_(t)
                del t
            if stored == "bf16":
                weights = ExpertWeights.from_tensors(stacked["gate", "weight"], stacked["up", "weight"],
                                                     stacked["down", "weight"], storage=storage or "bf16",
                                                     threads=threads, partitions=partitions, numa=numa)
            else:
                gate, up, down = (tuple(stacked[p, part] for part in per_expert_parts) for p in ("gate", "up", "down"))
                weights = ExpertWeights.from_quantized(stored, gate, up, down, threads=threads)
        t = stacked = blocks = scales = gate = up = down = None  # the torch copy of the layer
        _release_freed_memory()
        yield layer, weights


def _release_freed_memory() -> None:
    """Returns the freed torch copy of a layer to the OS: glibc keeps freed blocks below its (adaptive)
    mmap threshold in the heap, which would make the transient layer look resident."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# ---- PEFT adapter format ---------------------------------------------------------------------------------------
#
# PEFT puts LoRA on a v5 experts module's 3-D parameters with `target_parameters`; each ParamWrapper
# holds lora_A [E*R, in] (expert e: rows e*R..) and lora_B [out, R*E] (expert e: columns k*E + e).
# The wrapper of the module's first parameter is innermost, so its keys carry `.base_layer`.
# gate_up_proj gets one LoRA over both halves: ours (separate gate and up LoRA of rank r) is that
# LoRA at rank 2r with A = [Ag; Au] and B = blockdiag(Bg, Bu), exactly. PEFT's config has one rank,
# so down_proj's LoRA is written at rank 2r too, its extra components zero (dropped again on load).

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft_keys(path: str, kt: KTExperts) -> dict[str, str]:
    """projection ('gate_up_proj' / 'down_proj') -> PEFT key prefix."""
    order = getattr(kt, "peft_param_order", ["gate_up_proj", "down_proj"])
    prefix = f"base_model.model.{path}"
    return {order[0]: f"{prefix}.base_layer", order[1]: prefix}


def _target_suffix(path: str) -> str:
    """'model.layers.3.mlp.experts' -> 'mlp.experts' (the part PEFT's target_parameters names)."""
    return _LAYER_OF_MODULE.split(path, maxsplit=1)[-1] if _LAYER_OF_MODULE.search(path) else path


def _patched_layers(model: nn.Module) -> list[tuple[str, KTExperts]]:
    layers = kt_layers(model)
    if not layers:
        raise ValueError("model: it has no kt-functional experts; call kt_functional.hf.patch_model(model) first")
    if any(not kt.lora_rank for _, kt in layers):
        raise ValueError("model: it was patched without LoRA (lora_rank=None); there is no adapter")
    return layers


def save_adapter(model: nn.Module, save_directory) -> None:
    """Writes the experts' LoRA as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

    peft.PeftModel.from_pretrained(unpatched_model, save_directory) then computes what the patched
    model computes. A model patched with owner_rank: every rank calls it (collective); the owner
    writes the adapter (the same file a single process writes) and every rank returns once it is written.
    """
    group = distributed.group_of(model)
    if group is None:
        _write_adapter(model, save_directory)
    else:
        group.run_on_owner(lambda: _write_adapter(model, save_directory))


def _write_adapter(model: nn.Module, save_directory) -> None:
    from safetensors.torch import save_file

    layers = _patched_layers(model)
    for path, kt in layers:
        layout = _layout_of(kt)
        if layout.is_transposed or not layout.is_concatenated or not layout.has_gate:
            raise ValueError(f"model: {path} stores its experts as {layout}; the PEFT adapter format is written for "
                             "gate_up_proj [E, 2I, H] with gate rows first (is_transposed=False, is_concatenated=True, "
                             "has_gate=True); save the LoRA merged instead: kt_functional.hf.unpatch_model(model, "
                             "merge_lora=True).save_pretrained(directory)")
    ranks = {kt.lora_rank for _, kt in layers}
    alphas = {kt.lora_alpha for _, kt in layers}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"model: one adapter needs one LoRA rank and alpha, got ranks {ranks}, alphas {alphas}")
    r, alpha = ranks.pop(), alphas.pop()
    tensors = {}
    suffixes = set()
    for path, kt in layers:
        E, H, I = kt.num_experts, kt.hidden_size, kt.intermediate_size
        keys = _peft_keys(path, kt)
        ga, gb, ua, ub, da, db = (getattr(kt, n).detach().float() for n in _LORA_NAMES)
        a_gu = torch.cat([ga, ua], dim=1)  # [E, 2r, H]
        b_gu = torch.zeros(E, 2 * I, 2 * r)
        b_gu[:, :I, :r], b_gu[:, I:, r:] = gb, ub
        tensors[f"{keys['gate_up_proj']}.lora_A.weight"] = a_gu.reshape(E * 2 * r, H).contiguous()
        tensors[f"{keys['gate_up_proj']}.lora_B.weight"] = b_gu.permute(1, 2, 0).reshape(2 * I, 2 * r * E).contiguous()
        da, db = _pad_rank(da, db, 2 * r)
        tensors[f"{keys['down_proj']}.lora_A.weight"] = da.reshape(E * 2 * r, I).contiguous()
        tensors[f"{keys['down_proj']}.lora_B.weight"] = db.permute(1, 2, 0).reshape(H, 2 * r * E).contiguous()
        suffixes.add(_target_suffix(path))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "r": 2 * r,  # gate_up_proj: gate and up LoRA side by side
        "lora_alpha": 2 * alpha,  # the same scale alpha / r
        "target_modules": [],
        "target_parameters": sorted(f"{s}.{p}" for s in suffixes for p in ("gate_up_proj", "down_proj")),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    os.makedirs(save_directory, exist_ok=True)
    save_file(tensors, os.path.join(save_directory, _ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(save_directory, _ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _pattern_value(patterns: dict, key: str, default):
    for pattern, value in patterns.items():  # PEFT's rule: the pattern matches a suffix of the key
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _split_gate_up(a: torch.Tensor, b: torch.Tensor, I: int):
    """PEFT's gate_up LoRA (a [E, R, H], b [E, 2I, R]) as separate gate / up LoRA with the same product."""
    R = a.shape[1]
    h = R // 2
    if R % 2 == 0 and not b[:, :I, h:].any() and not b[:, I:, :h].any():  # block diagonal: ours, rank R/2
        return a[:, :h], b[:, :I, :h], a[:, h:], b[:, I:, h:]
    return a, b[:, :I], a, b[:, I:]  # one A shared by gate and up, at rank R


def _trim_rank(a: torch.Tensor, b: torch.Tensor):
    """Drops trailing rank components that are zero in both A and B (they add nothing)."""
    used = (a.any(dim=2).any(dim=0) | b.any(dim=1).any(dim=0)).nonzero()
    rank = int(used.max()) + 1 if len(used) else 1
    return a[:, :rank], b[:, :, :rank]


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int):
    extra = rank - a.shape[1]
    if extra == 0:
        return a, b
    return (torch.cat([a, a.new_zeros(a.shape[0], extra, a.shape[2])], dim=1),
            torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], extra)], dim=2))


def load_adapter(model: nn.Module, adapter_directory) -> nn.Module:
    """Loads a PEFT LoRA adapter on the v5 expert parameters (e.g. one save_adapter wrote) into a patched model.

    The KTExperts' LoRA parameters are replaced (their rank follows the adapter): build the
    optimizer after loading. Returns the model. A model patched with owner_rank: every rank calls it
    (collective); the owner reads the adapter and every rank returns once it is loaded.
    """
    group = distributed.group_of(model)
    if group is None:
        _read_adapter(model, adapter_directory)
    else:
        group.run_on_owner(lambda: _read_adapter(model, adapter_directory))
    return model


def _read_adapter(model: nn.Module, adapter_directory) -> None:
    from safetensors.torch import load_file

    layers = kt_layers(model)
    if not layers:
        raise ValueError("model: it has no kt-functional experts; call kt_functional.hf.patch_model(model) first")
    root = os.fspath(adapter_directory)
    config_path, weights_path = os.path.join(root, _ADAPTER_CONFIG), os.path.join(root, _ADAPTER_WEIGHTS)
    if not (os.path.exists(config_path) and os.path.exists(weights_path)):
        raise FileNotFoundError(f"adapter_directory: expected {_ADAPTER_CONFIG} and {_ADAPTER_WEIGHTS} in {root}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise ValueError(f"adapter_directory: only plain LoRA adapters are supported, got {config.get('peft_type')}")
    state = load_file(weights_path)
    state = {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k): v for k, v in state.items()}

    def scale(param_key: str, rank: int) -> float:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, param_key, config.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    loaded = []
    for path, kt in layers:
        layout = _layout_of(kt)
        if layout.is_transposed or not layout.is_concatenated or not layout.has_gate:
            raise ValueError(f"model: {path} stores its experts as {layout}; load_adapter reads PEFT adapters of "
                             "gate_up_proj [E, 2I, H] with gate rows first only")
        E, H, I = kt.num_experts, kt.hidden_size, kt.intermediate_size
        prefix = f"base_model.model.{path}"
        pairs = {}
        for wrapper in (f"{prefix}.base_layer", prefix):
            a, b = state.get(f"{wrapper}.lora_A.weight"), state.get(f"{wrapper}.lora_B.weight")
            if a is None or b is None:
                continue
            which = {(H, 2 * I): "gate_up_proj", (I, H): "down_proj"}.get((a.shape[1], b.shape[0]))
            if which is None or a.shape[0] % E or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter_directory: {wrapper} LoRA shapes A {list(a.shape)}, B {list(b.shape)} "
                                 f"do not fit experts with (E, H, I) = {(E, H, I)}")
            R = a.shape[0] // E
            pairs[which] = (a.float().reshape(E, R, a.shape[1]), b.float().reshape(b.shape[0], R, E).permute(2, 0, 1))
        if set(pairs) != {"gate_up_proj", "down_proj"}:
            raise ValueError(f"adapter_directory: no LoRA for both gate_up_proj and down_proj of {path}")
        (a_gu, b_gu), (a_d, b_d) = pairs["gate_up_proj"], pairs["down_proj"]
        s_gu, s_d = scale(f"{path}.gate_up_proj", a_gu.shape[1]), scale(f"{path}.down_proj", a_d.shape[1])
        ga, gb, ua, ub = _split_gate_up(a_gu, b_gu, I)
        a_d, b_d = _trim_rank(a_d, b_d)
        rank = max(ga.shape[1], a_d.shape[1])
        alpha = s_gu * rank  # our one scale alpha / rank equals the gate_up scale; fold the down ratio into Bd
        ga, gb = _pad_rank(ga, gb, rank)
        ua, ub = _pad_rank(ua, ub, rank)
        da, db = _pad_rank(a_d, b_d * (s_d / s_gu), rank)
        loaded.append((kt, dict(zip(_LORA_NAMES, (ga, gb, ua, ub, da, db))), alpha))
    for kt, tensors, alpha in loaded:  # all layers validated before any is changed
        dtype = kt.gate_a.dtype if kt.lora_rank else torch.float32
        kt.set_lora({n: t.to(dtype) for n, t in tensors.items()}, alpha)


__all__ = ["patch_model", "unpatch_model", "load_experts", "save_adapter", "load_adapter", "kt_layers", "torch_lora_twin",
           "experts_support", "ExpertsLayout", "EXPERTS_IMPLEMENTATION", "ADAPTER_SUBDIR"]
