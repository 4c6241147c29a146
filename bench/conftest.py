"""Fixtures of the pytest-benchmark suite (run explicitly: ``python -m pytest bench ...``).

- ``machine`` (session): the machine's measured compute peak (``_core.kernel_peak``: the
  library's own micro-kernel in a tight L1-resident loop on all threads, and on one thread;
  best of 3 runs of 0.5 s) and read bandwidth (median of 7 ``torch.sum`` over a 1 GiB fp32
  tensor). Measured once at session start, printed, put into every benchmark's
  ``extra_info`` and into the JSON's ``machine_info["kt_functional"]``.
- ``case`` = (shape name, T), a module-scoped parameter over CASES, so pytest runs all tests
  of one case together and in CASES order; ``T`` and ``layer`` derive from it.
- ``layer``: random bf16 weights, the packed kt copy, LoRA adapters for kt and for the torch
  peers, and routed tokens for the largest T of its shape. Built once per shape by the
  session-scoped ``layers`` store, which holds one layer at a time and frees it before
  building the next (24 GiB machine).

``KT_BENCH_SMOKE=1`` swaps in tiny shapes to check the suite itself in seconds.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field

import pytest
import torch

import kt_functional as ktf
from kt_functional import reference

SMOKE = os.environ.get("KT_BENCH_SMOKE", "") not in ("", "0")


@dataclass(frozen=True)
class Shape:
    name: str
    E: int
    H: int
    I: int
    k: int
    r: int
    tokens: tuple[int, ...]  # the T values benchmarked at this shape


if SMOKE:
    SHAPES = {
        "qwen3": Shape("qwen3", E=16, H=256, I=96, k=4, r=8, tokens=(16, 128)),
        "large": Shape("large", E=8, H=512, I=192, k=4, r=8, tokens=(64,)),
    }
else:
    SHAPES = {
        # Qwen3-30B-A3B: one MoE layer's routed experts.
        "qwen3": Shape("qwen3", E=128, H=2048, I=768, k=8, r=16, tokens=(16, 128, 1024, 4096)),
        # A larger layer: 4x the expert size, fewer experts.
        "large": Shape("large", E=32, H=4096, I=1536, k=8, r=16, tokens=(1024,)),
    }

#: (shape name, T) in run order; tests parametrize over these.
CASES = [(s.name, T) for s in SHAPES.values() for T in s.tokens]
#: T of the thread-scaling benchmark (on the qwen3 layer).
SCALING_T = 128 if SMOKE else 1024


def all_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- machine
def _read_bandwidth_gbs(nbytes: int = 1 << 30, repeat: int = 7) -> float:
    """Read bandwidth in GB/s: median time of torch.sum over an fp32 tensor of nbytes."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    a.sum()  # warm-up (page faults are already paid by ones())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    del a
    gc.collect()
    return nbytes / statistics.median(times) / 1e9


def _kernel_peak(isa: str, threads: int, tries: int = 3) -> float:
    """GFLOP/s of the library's micro-kernel in a tight L1-resident loop: the best of a few
    short runs (a peak; the best run is the one least disturbed by other load)."""
    seconds = 0.1 if SMOKE else 0.5
    return max(ktf._core.kernel_peak(isa, threads, seconds) for _ in range(tries))


def _measure_machine() -> dict:
    info = ktf.cpu_info()
    isa, threads = info["isa"], all_threads()
    peak = _kernel_peak(isa, threads)
    peak_1t = _kernel_peak(isa, 1) if threads > 1 else peak
    return {
        "isa": isa,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "peak_gflops": peak,
        "peak_gflops_1thread": peak_1t,
        "read_gb_per_s": _read_bandwidth_gbs(64 << 20 if SMOKE else 1 << 30),
        "smoke": SMOKE,
    }


_MACHINE: dict = {}


@pytest.fixture(scope="session")
def machine(request) -> dict:
    if not _MACHINE:
        _MACHINE.update(_measure_machine())
        m = _MACHINE
        line = (f"kt_functional bench: isa={m['isa']}, {m['threads']} threads; measured peak "
                f"{m['peak_gflops']:.1f} GFLOP/s ({m['peak_gflops_1thread']:.1f} on 1 thread), "
                f"read bandwidth {m['read_gb_per_s']:.1f} GB/s" + (" [SMOKE shapes]" if SMOKE else ""))
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print("\n" + line, flush=True)
    return _MACHINE


def pytest_benchmark_update_machine_info(config, machine_info):
    if _MACHINE:
        machine_info["kt_functional"] = dict(_MACHINE)


# ----------------------------------------------------------------------------- layers
@dataclass
class Layer:
    """One MoE layer: torch weights (peers), packed weights + LoRA (kt), tokens for max T."""

    shape: Shape
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    lora: dict            # fp32 LoRA tensors (PEFT shapes), read by kt
    alpha: float
    scale: float
    x: torch.Tensor       # [T_max, H] bf16
    ids: torch.Tensor     # [T_max, k] int64
    w: torch.Tensor       # [T_max, k] fp32
    gy: torch.Tensor      # [T_max, H] bf16
    weights: ktf.ExpertWeights
    states: dict = field(default_factory=dict)  # threads -> MoEState

    @property
    def name(self) -> str:
        return self.shape.name

    def state(self, threads: int | None = None, *, variant: str = "default") -> ktf.MoEState:
        """variant: "default"; "resident" (backward_weights="resident": the transposed copy kept);
        "no_lora" (frozen experts, for LoRA's share of the step); "amx_emulated" (tile counts);
        "storage:<name>" (the weights quantized into that storage format at pack time); "base:<name>"
        (the same without LoRA: the base layer alone, bf16 included)."""
        threads = threads or all_threads()
        key = (threads, variant)
        if key not in self.states:
            weights, lora = self.weights, ktf.LoRA(**self.lora, alpha=self.alpha)
            if variant == "resident":
                weights = ktf.ExpertWeights.from_tensors(self.gate, self.up, self.down, threads=threads,
                                                         backward_weights="resident")
            storage = variant.partition(":")[2] if variant.startswith(("storage:", "base:")) else "bf16"
            if storage != "bf16":
                weights = ktf.ExpertWeights.from_tensors(self.gate, self.up, self.down, threads=threads,
                                                         storage=storage)
            if variant == "no_lora" or variant.startswith("base:"):
                lora = None
            isa = "amx_emulated" if variant == "amx_emulated" else None
            # one extra packed copy at most
            self.states = {k: v for k, v in self.states.items()
                           if k[1] != "resident" and not k[1].startswith(("storage:", "base:"))}
            self.states[key] = ktf.MoEState(weights, lora, threads=threads, isa=isa)
        return self.states[key]

    def tokens(self, T: int):
        """(x, ids, w, gy) of the first T tokens (each token is routed independently)."""
        return self.x[:T], self.ids[:T], self.w[:T], self.gy[:T]

    def peer_lora(self) -> dict:
        """Fresh fp32 LoRA leaves requiring grad, for the torch peers."""
        return {n: t.detach().clone().requires_grad_(True) for n, t in self.lora.items()}

    def active_experts(self, T: int) -> int:
        ids = self.ids[:T]
        return int(torch.unique(ids[ids >= 0]).numel())

    def expert_bytes(self) -> int:
        """bf16 bytes of one expert's gate, up and down weights."""
        s = self.shape
        return 3 * s.H * s.I * 2

    def release(self):
        for name in ("gate", "up", "down", "x", "ids", "w", "gy", "weights"):
            setattr(self, name, None)
        self.lora, self.states = {}, {}
        gc.collect()


def build_layer(shape: Shape, seed: int = 0) -> Layer:
    T_max = max(shape.tokens)
    p = reference.make_problem(shape.E, shape.H, shape.I, shape.k, T_max, shape.r, seed)
    del p.gate_up  # a second copy of gate/up that the bench does not need
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(T_max, shape.H, generator=gen).bfloat16()
    weights = ktf.ExpertWeights.from_tensors(p.gate, p.up, p.down, threads=all_threads())
    return Layer(shape, p.gate, p.up, p.down, p.lora, p.alpha, p.scale, p.x, p.ids, p.w, gy, weights)


class Layers:
    """Holds at most one built layer: asking for another shape frees the current one first."""

    def __init__(self, config):
        self.config = config
        self.current: Layer | None = None

    def get(self, name: str) -> Layer:
        if self.current is not None and self.current.name == name:
            return self.current
        self.clear()
        t0 = time.perf_counter()
        lay = build_layer(SHAPES[name])
        s = lay.shape
        capman = self.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\nlayer {s.name}: E={s.E} H={s.H} I={s.I} k={s.k} r={s.r}; packed "
                  f"{lay.weights.nbytes / 2**30:.2f} GiB; built in {time.perf_counter() - t0:.1f} s", flush=True)
        if name == "qwen3":  # one packed copy: the memory target
            _MACHINE["packed_over_bf16"] = lay.weights.nbytes / (s.E * lay.expert_bytes())
        self.current = lay
        return lay

    def clear(self):
        if self.current is not None:
            self.current.release()
            self.current = None


@pytest.fixture(scope="session")
def layers(request):
    store = Layers(request.config)
    yield store
    store.clear()


@pytest.fixture(scope="module")
def case(request) -> tuple[str, int]:
    """(shape name, T); parametrized over CASES by pytest_generate_tests."""
    return request.param


@pytest.fixture
def layer(case, layers, machine) -> Layer:
    return layers.get(case[0])


@pytest.fixture
def T(case) -> int:
    return case[1]


# ----------------------------------------------------------------------------- parametrization
#: Cases of the benchmarks that compare kt with itself (resident backward layout, no LoRA).
SELF_CASES = [("qwen3", T) for T in ((128,) if SMOKE else (1024, 4096))]
#: Cases of the storage-format benchmarks (memory-bound small T, compute-bound large T).
STORAGE_CASES = [("qwen3", T) for T in ((16, 128) if SMOKE else (16, 1024))]
#: The decode-size case of the storage benchmarks (the base layer alone is compared there).
DECODE_CASES = STORAGE_CASES[:1]


def pytest_configure(config):
    config.addinivalue_line("markers", "scaling: thread-scaling benchmark, run only at (qwen3, SCALING_T)")
    config.addinivalue_line("markers", "self_cases: run only at the SELF_CASES")
    config.addinivalue_line("markers", "storage_cases: run only at the STORAGE_CASES")
    config.addinivalue_line("markers", "decode_cases: run only at the DECODE_CASES")


def pytest_generate_tests(metafunc):
    # One module-scoped fixture parameter `case` = (shape name, T): pytest runs the tests of one
    # case together, in CASES order, so each layer is built once (and freed before the next).
    # (Indirect: pytest groups items across test functions only by fixture parameters.)
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, indirect=True, scope="module",
                             ids=[f"{name}-T{T}" for name, T in CASES])


def pytest_collection_modifyitems(config, items):
    # The scaling test is parametrized over the full CASES list (same parameter indices, so
    # pytest orders it with the other tests of its case) and keeps only its one case here.
    keep, drop = [], []
    for item in items:
        cs = getattr(item, "callspec", None)
        case = cs.params.get("case") if cs is not None else None
        is_other_case = ((item.get_closest_marker("scaling") is not None and case != ("qwen3", SCALING_T))
                         or (item.get_closest_marker("self_cases") is not None and case not in SELF_CASES)
                         or (item.get_closest_marker("storage_cases") is not None and case not in STORAGE_CASES)
                         or (item.get_closest_marker("decode_cases") is not None and case not in DECODE_CASES))
        (drop if is_other_case else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
