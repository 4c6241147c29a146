"""Benchmarks of the MoE expert layer: kt_functional vs the torch peers, forward / backward / fwd+bwd.

Groups read ``"<kind> T=<T> <shape>"`` (kind: forward, backward, fwd+bwd) and
``"threads fwd+bwd T=<T> qwen3"`` for the thread scaling of kt. Every benchmark records in
``extra_info``: tokens_per_s, tflops (base FLOPs only: 6*T*k*H*I per pass, see FLOPS),
pct_of_peak (of the measured micro-kernel peak), gb_per_s (the active experts' bf16 weight
bytes per pass / time) and, for kt's forward, the cache's nbytes against its bound.

Run: ``python -m pytest bench --benchmark-json=bench/latest.json -p no:cacheprovider``
(see bench/README.md). The (layer, T) parametrization comes from conftest.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import kt_functional as ktf
from kt_functional import reference

IMPLS = ("kt", "grouped_mm", "eager")
PEERS = {"grouped_mm": reference.grouped_mm_moe, "eager": reference.eager_loop_moe}
#: Passes over the weights per kind (forward and backward each do 3 GEMMs per route).
PASSES = {"forward": 1, "backward": 1, "fwd+bwd": 2}
#: Work (T*k*H*I) from which a case counts as heavy and gets fewer rounds (qwen3 at T=4096).
HEAVY_WORK = 4096 * 8 * 2048 * 768


@dataclass
class Step:
    """What one benchmark round runs: target(*setup()) or target()."""

    target: Callable
    setup: Callable | None = None


def rounds_for(layer, T: int, impl: str) -> tuple[int, int]:
    """(rounds, warmup_rounds): few enough for the whole bench to take ~5 min on 2 cores."""
    s = layer.shape
    heavy = T * s.k * s.H * s.I >= HEAVY_WORK
    if impl == "kt":
        return (5, 1) if heavy else (9, 1)
    return (3, 1) if heavy else (5, 1)


def kt_steps(layer, T: int, threads: int | None = None, variant: str = "default") -> dict[str, Step]:
    state = layer.state(threads, variant=variant)
    x, ids, w, gy = layer.tokens(T)

    def forward():
        return ktf.moe_forward(state, x, ids, w)

    def fresh_cache():  # backward-only rounds: a new forward cache each round, not timed
        return (forward()[1],), {}

    def backward(cache):
        return ktf.moe_backward(state, cache, gy)

    def fwd_bwd():
        return backward(forward()[1])

    return {"forward": Step(forward), "backward": Step(backward, fresh_cache), "fwd+bwd": Step(fwd_bwd)}


def peer_steps(layer, T: int, impl: str) -> dict[str, Step]:
    """A torch peer with autograd: x, w and the six LoRA tensors are leaves requiring grad."""
    fn = PEERS[impl]
    x, ids, w, gy = layer.tokens(T)
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    lora = layer.peer_lora()
    leaves = [x, w, *lora.values()]

    def forward():
        return fn(x, ids, w, layer.gate, layer.up, layer.down, lora=lora, scale=layer.scale)

    def zero_grads():
        for t in leaves:
            t.grad = None

    def fresh_graph():  # backward-only rounds: a new autograd graph each round, not timed
        zero_grads()
        return (forward(),), {}

    def backward(y):
        y.backward(gy)

    def fwd_bwd():
        zero_grads()
        backward(forward())

    return {"forward": Step(forward), "backward": Step(backward, fresh_graph), "fwd+bwd": Step(fwd_bwd)}


def steps_for(layer, T: int, impl: str) -> dict[str, Step]:
    return kt_steps(layer, T) if impl == "kt" else peer_steps(layer, T, impl)


def cache_bound(layer, T: int) -> int:
    """The backward cache target: x (bf16) + g, u (bf16) per route + the three LoRA a's (fp32)."""
    s = layer.shape
    return T * s.H * 2 + T * s.k * 2 * s.I * 2 + T * s.k * 3 * s.r * 4


def record(benchmark, machine: dict, layer, T: int, kind: str, impl: str, threads: int,
           expert_bytes: float | None = None, **extra):
    """Puts throughput, TFLOP/s, % of the measured peak and GB/s into benchmark.extra_info.
    expert_bytes: one expert's weight bytes as stored (default: bf16)."""
    info = benchmark.extra_info
    s = layer.shape
    routes = int((layer.ids[:T] >= 0).sum())
    active = layer.active_experts(T)
    flops = PASSES[kind] * 6 * routes * s.H * s.I
    weight_bytes = PASSES[kind] * active * (expert_bytes or layer.expert_bytes())
    info.update(kind=kind, shape=s.name, T=T, impl=impl, threads=threads, E=s.E, H=s.H, I=s.I, k=s.k, r=s.r,
                isa=machine["isa"], peak_gflops=machine["peak_gflops"], read_gb_per_s=machine["read_gb_per_s"],
                flops=flops, active_experts=active, weight_bytes=weight_bytes, **extra)
    if benchmark.stats is None:  # --benchmark-disable
        return
    t = benchmark.stats.stats.median
    info.update(median_s=t, tokens_per_s=T / t, tflops=flops / t / 1e12,
                pct_of_peak=100.0 * flops / t / 1e9 / machine["peak_gflops"],
                gb_per_s=weight_bytes / t / 1e9)


def run_bench(benchmark, machine, layer, T, kind, impl, step: Step, *, group=None, threads=None, **extra):
    benchmark.group = group or f"{kind} T={T} {layer.name}"
    rounds, warmup = rounds_for(layer, T, "kt" if impl.startswith("kt") else impl)
    benchmark.pedantic(step.target, setup=step.setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    record(benchmark, machine, layer, T, kind, impl, threads or layer.state().threads, **extra)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, machine, layer, T, impl):
    extra = {}
    if impl == "kt":
        _, cache = ktf.moe_forward(layer.state(), *layer.tokens(T)[:3])
        extra = {"cache_nbytes": cache.nbytes, "cache_bound": cache_bound(layer, T)}
        del cache
    run_bench(benchmark, machine, layer, T, "forward", impl, steps_for(layer, T, impl)["forward"], **extra)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward(benchmark, machine, layer, T, impl):
    run_bench(benchmark, machine, layer, T, "backward", impl, steps_for(layer, T, impl)["backward"])


@pytest.mark.parametrize("impl", IMPLS)
def test_fwd_bwd(benchmark, machine, layer, T, impl):
    run_bench(benchmark, machine, layer, T, "fwd+bwd", impl, steps_for(layer, T, impl)["fwd+bwd"])


@pytest.mark.scaling
@pytest.mark.parametrize("threads", (1, 2))
def test_thread_scaling(benchmark, machine, layer, T, threads):
    step = kt_steps(layer, T, threads)["fwd+bwd"]
    run_bench(benchmark, machine, layer, T, "fwd+bwd", "kt", step, threads=threads,
              group=f"threads fwd+bwd T={T} {layer.name}")


@pytest.mark.self_cases
def test_backward_resident(benchmark, machine, layer, T):
    """kt's backward with the transposed weights kept resident (2x memory), against the default
    one packed copy transposed per block (test_backward's kt)."""
    step = kt_steps(layer, T, variant="resident")["backward"]
    run_bench(benchmark, machine, layer, T, "backward", "kt_resident", step)


@pytest.mark.self_cases
def test_fwd_bwd_no_lora(benchmark, machine, layer, T):
    """kt without LoRA: LoRA's share of the step is 1 - this / kt's fwd+bwd."""
    step = kt_steps(layer, T, variant="no_lora")["fwd+bwd"]
    run_bench(benchmark, machine, layer, T, "fwd+bwd", "kt_no_lora", step)


@pytest.mark.storage_cases
@pytest.mark.parametrize("storage", ("int8", "fp8_block", "int4_group", "mxfp4"))
@pytest.mark.parametrize("kind", ("forward", "fwd+bwd"))
def test_storage(benchmark, machine, layer, T, kind, storage):
    """kt with the base weights in a quantized storage (quantized at pack time), against bf16 (test_forward /
    test_fwd_bwd's kt): fewer bytes streamed per pass (gb_per_s counts the stored bytes)."""
    variant = f"storage:{storage}"
    weights = layer.state(variant=variant).weights
    step = kt_steps(layer, T, variant=variant)[kind]
    run_bench(benchmark, machine, layer, T, kind, f"kt_{storage}", step, expert_bytes=weights.nbytes / layer.shape.E,
              storage=storage)


@pytest.mark.decode_cases
@pytest.mark.parametrize("storage", ("bf16", "int8", "fp8_block", "int4_group", "mxfp4"))
def test_storage_base(benchmark, machine, layer, T, storage):
    """The base layer alone (no LoRA) in each storage, forward at the decode-size case: the
    bytes-streamed comparison without LoRA's fixed cost (its fp32 matrices are read and packed per
    call in every storage)."""
    variant = f"base:{storage}"
    weights = layer.state(variant=variant).weights
    step = kt_steps(layer, T, variant=variant)["forward"]
    run_bench(benchmark, machine, layer, T, "forward", f"kt_base_{storage}", step,
              expert_bytes=weights.nbytes / layer.shape.E, storage=storage)


def kt_split_step(layer, T: int) -> Step:
    """fwd+bwd on the split path (what an experts module's own _apply_gate gets): the kernels' gate/up part,
    silu(g) * u in torch under autograd, the kernels' down part, and back. The same math as kt's fused
    fwd+bwd, so the difference is the split path's cost."""
    from kt_functional import ops

    state = layer.state()
    x, ids, w, gy = layer.tokens(T)
    I = layer.shape.I

    def fwd_bwd():
        gate_up, gate_up_cache = ops.moe_gate_up_forward(state, x, ids, w)
        gate_up.requires_grad_(True)
        h = torch.nn.functional.silu(gate_up[..., :I]) * gate_up[..., I:]
        _, down_cache = ops.moe_down_forward(state, h.detach(), ids, w)
        down = ops.moe_down_backward(state, down_cache, gy)
        h.backward(down.x)
        return ops.moe_gate_up_backward(state, gate_up_cache, gate_up.grad)

    return Step(fwd_bwd)


@pytest.mark.self_cases
def test_fwd_bwd_split_gate(benchmark, machine, layer, T):
    """kt's split path (a gate function in torch between two kernel calls) against the fused epilogue."""
    run_bench(benchmark, machine, layer, T, "fwd+bwd", "kt_split", kt_split_step(layer, T))


def test_amx_tile_proxies(benchmark, machine, layer, T):
    """The AMX path's tile operations at this case, counted by the emulated tile unit (math off):
    dot products issued vs the useful minimum (padding waste) and tile loads per dot product. The
    time of this one round is the emulator's and means nothing."""
    core = ktf._core
    step = kt_steps(layer, T, variant="amx_emulated")["fwd+bwd"]
    s = layer.shape
    routes = int((layer.ids[:T] >= 0).sum())
    core.set_amx_emulator_math(False)
    try:
        core.reset_amx_emulator_counters()
        benchmark.pedantic(step.target, rounds=1, warmup_rounds=0, iterations=1)
        counts = core.amx_emulator_counters()
    finally:
        core.set_amx_emulator_math(True)
    benchmark.group = f"proxy fwd+bwd T={T} {layer.name}"
    useful = 2 * routes * 3 * s.H * s.I / (16 * 16 * 32)  # multiply-adds / those of one TDPBF16PS
    benchmark.extra_info.update(
        kind="proxy", shape=s.name, T=T, impl="amx_emulated", dot_products=counts["dot_products"],
        useful_dot_products=useful, padding_waste=counts["dot_products"] / useful,
        tile_loads_per_dot=(counts["loads_a"] + counts["loads_b"] + counts["loads_c"]) / counts["dot_products"],
        loads_a=counts["loads_a"], loads_b=counts["loads_b"], loads_c=counts["loads_c"], stores_c=counts["stores_c"])
