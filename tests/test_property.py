"""Property-based test (hypothesis): random problems against the float32 reference on every ISA path.

Each example draws the sizes (H, I from 32 up, rarely multiples of 16/32; T from 1), experts per
token (more than E too: duplicate ids), -1 slots, LoRA rank (0 = no LoRA, 2 and up), the storage of the
base weights (bf16 in 3 draws of 7, else a quantized format checked on its dequantize()'d values), the dtypes
(x bf16/fp32, base weights fp32/bf16, LoRA fp32/bf16, w fp32/bf16, gy bf16/fp32) and each input's
layout (contiguous, transposed, strided, or a numpy array where numpy has the dtype), runs forward
and backward, and checks every output against the reference with MATH.md's tolerances.

The domain is where the kernels meet MATH.md's relative tolerance on every output: the largest
error is typically 0.4-0.5% (bf16 operands), and its tail crosses 1e-2 on the LoRA gradients when
they are few dot products: with a LoRA at T = 1 (an expert's dAg[e] = s (Bg^T dg) x^T is an outer
product with an r-vector of dot products over I, meaningless relatively near zero, like dw) about
7% of random problems fail; at rank 1 or H, I below 32 the tail also reaches 1e-2 now and then.
MATH.md bounds only dw by the magnitudes so far; hence here: with a LoRA, T >= 16 E and r >= 2.
One more tail, seen once in four fresh runs of 2000 examples per path: dw's plain relative error at 1.1%
(its magnitude bound at 0.16%) for E=1, k=6, T=16 with int4_group weights, where every slot repeats the
one expert and the T*k = 96 pairs that MATH.md's relative bound counts are 16 distinct dot products. A
bf16 state of the same dequantized values gives the same error on every path: the kernels agree with
themselves; how MATH.md's T*k >= 64 rule counts repeated slots is open (with the dw question above).
CI runs a fixed (derandomized) set of examples per path; KT_HYPOTHESIS_EXAMPLES=N runs N fresh
random examples per path instead. amx_emulated (a C++ model of the tile unit) is the slowest path:
its shapes are kept small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (W_MAGNITUDE, assert_matches_reference, ktf, lora_tensors, ref, strided_view,
                     to_torch, transposed_view)


@dataclass(frozen=True)
class Limits:
    E: int
    H: int
    I: int
    T: int
    r: int
    examples: int  # per path in CI


LIMITS = {
    "amx_emulated": Limits(E=4, H=80, I=64, T=48, r=16, examples=100),
    "default": Limits(E=8, H=150, I=120, T=128, r=20, examples=200),
}
ENV_EXAMPLES = os.environ.get("KT_HYPOTHESIS_EXAMPLES")
LAYOUTS = ("contiguous", "transposed", "strided", "numpy")
MIN_SIZE = 32  # H, I
LORA_TOKENS_PER_EXPERT = 16  # with a LoRA, T >= 16 E (module docstring)


def _limits(isa: str) -> Limits:
    return LIMITS.get(isa, LIMITS["default"])


def _settings(isa: str):
    fresh = ENV_EXAMPLES is not None
    return settings(max_examples=int(ENV_EXAMPLES) if fresh else _limits(isa).examples, derandomize=not fresh,
                    database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, isa: str):
    lim = _limits(isa)
    r = draw(st.sampled_from([0, 0, 2, 3, 4, 7, 8, lim.r]))
    E = draw(st.integers(1, lim.E if r == 0 else min(lim.E, lim.T // LORA_TOKENS_PER_EXPERT)))
    p = dict(
        E=E,
        H=draw(st.integers(MIN_SIZE, lim.H)),
        I=draw(st.integers(MIN_SIZE, lim.I)),
        T=draw(st.sampled_from([1, 2, 3]) | st.integers(1, lim.T) if r == 0
               else st.integers(LORA_TOKENS_PER_EXPERT * E, lim.T)),
        k=draw(st.integers(1, 6)),
        r=r,
        unused=draw(st.sampled_from([0.0, 0.25, 0.25, 0.5, 1.0])),  # share of -1 slots (1.0: nothing routed)
        duplicate=draw(st.booleans()),  # a token's second slot repeats its first expert
        x_dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])),
        weight_dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])),
        lora_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        storage=draw(st.sampled_from(["bf16", "bf16", "bf16", "int8", "fp8_block", "int4_group", "mxfp4"])),
        w_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        gy_dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])),
        layouts={name: draw(st.sampled_from(LAYOUTS)) for name in ("x", "ids", "w", "gy", "lora")},
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return p


def _bf16_values(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to bf16, held in dtype: the kernels' operands are bf16, the reference upcasts the same values."""
    return t.bfloat16().to(dtype)


def _layout(t: torch.Tensor, layout: str):
    if layout == "numpy" and t.dtype != torch.bfloat16:  # numpy has no bf16: those stay torch
        return t.numpy()
    if layout == "transposed" and t.dim() >= 2:
        return transposed_view(t)
    if layout == "strided":
        return strided_view(t)
    return t


def _make(p):
    gen = torch.Generator().manual_seed(p["seed"])
    E, H, I, T, k, r = p["E"], p["H"], p["I"], p["T"], p["k"], p["r"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    gate = _bf16_values(randn(E, I, H) * H ** -0.5, p["weight_dtype"])
    up = _bf16_values(randn(E, I, H) * H ** -0.5, p["weight_dtype"])
    down = _bf16_values(randn(E, H, I) * I ** -0.5, p["weight_dtype"])
    x = _bf16_values(randn(T, H), p["x_dtype"])
    ids = torch.randint(0, E, (T, k), generator=gen)
    if p["duplicate"] and k > 1:
        ids[:, 1] = ids[:, 0]
    ids[torch.rand(T, k, generator=gen) < p["unused"]] = -1
    w = torch.softmax(randn(T, k), dim=1).to(p["w_dtype"])
    gy = _bf16_values(randn(T, H), p["gy_dtype"])
    lora = None
    if r:
        shapes = {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H),
                  "up_b": (E, I, r), "down_a": (E, r, I), "down_b": (E, H, r)}
        lora = {n: (randn(*s) * (s[2] ** -0.5 if n.endswith("_a") else 0.5 * r ** -0.5)).to(p["lora_dtype"])
                for n, s in shapes.items()}
    return gate, up, down, x, ids, w, gy, lora


def _check(isa: str, p: dict):
    K = ktf()
    gate, up, down, x, ids, w, gy, lora = _make(p)
    layouts = p["layouts"]
    weights = K.ExpertWeights.from_tensors(gate, up, down, threads=2, storage=p["storage"])
    if p["storage"] != "bf16":  # the reference multiplies by the values the kernels do (MATH.md)
        gate, up, down = weights.dequantize()
    lora_obj = None
    if lora is not None:
        lora_layout = "contiguous" if layouts["lora"] == "numpy" else layouts["lora"]
        lora_obj = K.LoRA(**{n: _layout(t, lora_layout) for n, t in lora.items()}, alpha=2.0 * p["r"])
    state = K.MoEState(weights, lora_obj, threads=2, isa=isa)
    y, cache = K.moe_forward(state, _layout(x, layouts["x"]), _layout(ids, layouts["ids"]),
                             _layout(w, layouts["w"]))
    grads = K.moe_backward(state, cache, _layout(gy, layouts["gy"]))

    x_numpy = isinstance(_layout(x, layouts["x"]), np.ndarray)
    assert isinstance(y, np.ndarray) == x_numpy and isinstance(grads.x, np.ndarray) == x_numpy
    assert to_torch(y).dtype == x.dtype and to_torch(grads.x).dtype == x.dtype
    assert to_torch(grads.w).dtype == (torch.float32 if x_numpy else w.dtype)
    assert (grads.lora is None) == (lora is None)

    scale = 2.0 if lora is not None else None
    args = (x, ids, w, gate, up, down, lora, scale, gy)
    y_ref = ref.moe_reference(*args[:-1])
    g_ref = ref.moe_reference_grads(*args)
    g_ref[W_MAGNITUDE] = ref.dw_magnitude(*args)
    assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}] {p}")
    unused = ids < 0
    assert torch.all(to_torch(grads.w)[unused] == 0), "dw at -1 slots must be 0"
    if lora is not None:
        routed = set(ids[ids >= 0].tolist())
        for n, g in lora_tensors(grads.lora).items():
            for e in set(range(p["E"])) - routed:
                assert torch.all(to_torch(g)[e] == 0), f"grads.lora.{n}[{e}] of an expert with no token must be 0"


def test_random_problems_match_reference(isa):
    @_settings(isa)
    @given(p=problems(isa))
    def run(p):
        _check(isa, p)

    run()

