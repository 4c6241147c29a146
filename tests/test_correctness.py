"""Forward and backward of the library against the float32 reference (MATH.md tolerance
1e-2 on y, dx, dw and all six LoRA gradients), on every ISA path in ktf.available_isas()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import (
    LORA_KEYS,
    TOL,
    check_state,
    fwd_bwd,
    grads_dict,
    ktf,
    lora_tensors,
    make_gy,
    make_lora,
    make_problem,
    make_state,
    make_weights,
    reference,
    assert_matches_reference,
    rel_err,
    strided_view,
    to_torch,
    transposed_view,
)

CASES = {
    "qwen3_slice": dict(E=16, H=256, I=96, k=8, T=128, r=16),
    "awkward_T1": dict(E=5, H=72, I=40, k=3, T=1, r=3),
    "awkward_T7": dict(E=5, H=72, I=40, k=3, T=7, r=3),
    "awkward_T129": dict(E=5, H=72, I=40, k=3, T=129, r=3),
    "top1": dict(E=8, H=64, I=48, k=1, T=33, r=4),
    "single_expert": dict(E=1, H=72, I=40, k=1, T=17, r=3),
    "idle_experts": dict(E=12, H=64, I=40, k=2, T=9, r=4, idle_experts=7),
    "unused_slots": dict(E=6, H=72, I=40, k=3, T=23, r=3, unused_frac=0.35, all_unused_tokens=(0, 5, 22)),
    "many_tokens_per_expert": dict(E=2, H=136, I=104, k=2, T=300, r=5),
    "rank1": dict(E=5, H=72, I=40, k=3, T=29, r=1),
    # experts with few rows run their LoRA in fp32 off the micro-kernel, ranks over one 16-wide block
    "few_rows_rank16": dict(E=8, H=80, I=48, k=4, T=6, r=16),
    "few_rows_rank20": dict(E=6, H=72, I=40, k=2, T=9, r=20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(isa, case):
    prob = make_problem(**CASES[case], seed=100 + list(CASES).index(case))
    state = make_state(prob, isa)
    y, grads, _, g_ref = check_state(state, prob, where=f"[{isa}/{case}]")
    assert y.dtype == torch.bfloat16 and grads.x.dtype == torch.bfloat16
    assert grads.w.dtype == torch.float32
    for n, t in lora_tensors(grads.lora).items():
        assert to_torch(t).dtype == torch.float32, n
        assert tuple(t.shape) == tuple(prob.lora[n].shape), n
    if case == "idle_experts":
        gd = grads_dict(grads)
        assert prob.idle
        for e in prob.idle:
            for n in LORA_KEYS:
                assert torch.all(gd[n][e] == 0), f"grads.lora.{n}[{e}] of an idle expert must be 0"


def test_unused_slots_exact_zeros(isa):
    """Tokens whose slots are all -1 get y == 0 and dx == 0 exactly; dw == 0 at -1 slots."""
    prob = make_problem(**CASES["unused_slots"], seed=5)
    state = make_state(prob, isa)
    y, grads, _, _ = check_state(state, prob)
    for t in (0, 5, 22):
        assert torch.all(y[t] == 0), f"token {t} has all slots -1: y must be exactly 0"
        assert torch.all(grads.x[t] == 0), f"token {t} has all slots -1: dx must be exactly 0"
    unused = prob.ids < 0
    assert torch.all(grads.w[unused] == 0), "dw at -1 slots must be 0"
    # w at unused slots is ignored
    w2 = prob.w.clone()
    w2[unused] = 7.0
    y2, _ = ktf().moe_forward(state, prob.x, prob.ids, w2, save_for_backward=False)
    assert torch.equal(y, y2)


def test_all_tokens_unused(isa):
    prob = make_problem(E=4, H=32, I=24, k=2, T=5, r=2, seed=3, all_unused_tokens=range(5))
    state = make_state(prob, isa)
    y, grads = fwd_bwd(state, prob.x, prob.ids, prob.w, make_gy(prob))
    assert y.shape == (5, 32) and torch.all(y == 0)
    gd = grads_dict(grads)
    for name, t in gd.items():
        assert torch.all(t == 0), name


def test_empty_batch(isa):
    prob = make_problem(E=4, H=72, I=40, k=3, T=0, r=3, seed=0)
    state = make_state(prob, isa)
    gy = torch.zeros(0, 72, dtype=torch.bfloat16)
    y, grads = fwd_bwd(state, prob.x, prob.ids, prob.w, gy)
    assert tuple(y.shape) == (0, 72) and y.dtype == torch.bfloat16
    assert tuple(grads.x.shape) == (0, 72) and grads.x.dtype == torch.bfloat16
    assert tuple(grads.w.shape) == (0, 3) and grads.w.dtype == torch.float32
    for n, t in lora_tensors(grads.lora).items():
        t = to_torch(t)
        assert tuple(t.shape) == tuple(prob.lora[n].shape) and torch.all(t == 0), n


def test_no_lora(isa):
    prob = make_problem(**CASES["awkward_T129"], seed=21)
    state = make_state(prob, isa, lora=None)
    y, grads, _, _ = check_state(state, prob, lora=None)
    assert grads.lora is None
    assert y.dtype == torch.bfloat16


def test_fp32_inputs(isa):
    """x, w, gy, weights and LoRA in float32 (bf16-representable values): y and dx float32."""
    prob = make_problem(**CASES["awkward_T129"], seed=22)
    f32 = make_problem(**CASES["awkward_T129"], seed=22)
    for name in ("x", "gate", "up", "down"):
        setattr(f32, name, getattr(prob, name).float())
    state = make_state(f32, isa)
    gy = make_gy(prob, dtype=torch.float32)
    y, grads, _, _ = check_state(state, f32, gy=gy)
    assert y.dtype == torch.float32
    assert grads.x.dtype == torch.float32 and grads.w.dtype == torch.float32


def test_numpy_inputs(isa):
    """numpy float32 x / w / gy, int64 and int32 ids, numpy weights: outputs are numpy."""
    prob = make_problem(**CASES["awkward_T7"], seed=23)
    K = ktf()
    weights = K.ExpertWeights.from_tensors(prob.gate.float().numpy(), prob.up.float().numpy(),
                                           prob.down.float().numpy())
    state = K.MoEState(weights, make_lora(prob), threads=2, isa=isa)
    x = prob.x.float().numpy()
    w = prob.w.numpy()
    gy = make_gy(prob, dtype=torch.float32).numpy()
    for ids in (prob.ids.numpy(), prob.ids.numpy().astype(np.int32)):
        y, grads = fwd_bwd(state, x, ids, w, gy)
        assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
        assert isinstance(grads.x, np.ndarray) and grads.x.dtype == np.float32
        assert isinstance(grads.w, np.ndarray) and grads.w.dtype == np.float32 and grads.w.shape == w.shape
        y_ref, g_ref = reference(prob, x=torch.from_numpy(x), ids=torch.from_numpy(ids), w=torch.from_numpy(w),
                                 gy=torch.from_numpy(gy))
        assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}/numpy {ids.dtype}]")


def test_noncontiguous_inputs(isa):
    """Transposed views and strided slices for x, ids, w, gy and every LoRA tensor."""
    prob = make_problem(**CASES["awkward_T129"], seed=24)
    lora_nc = {n: (transposed_view(t) if i % 2 == 0 else strided_view(t)) for i, (n, t) in enumerate(prob.lora.items())}
    for t in lora_nc.values():
        assert not t.is_contiguous()
    state = make_state(prob, isa, lora=make_lora(prob, **lora_nc))
    gy = make_gy(prob)
    variants = {
        "transposed": (transposed_view(prob.x), transposed_view(prob.ids), transposed_view(prob.w), transposed_view(gy)),
        "strided": (strided_view(prob.x), strided_view(prob.ids), strided_view(prob.w), strided_view(gy)),
    }
    for name, (x, ids, w, g) in variants.items():
        for t in (x, ids, w, g):
            assert not t.is_contiguous()
        y, grads = fwd_bwd(state, x, ids, w, g)
        y_ref, g_ref = reference(prob, gy=gy)
        assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}/{name}]")


def test_from_fused_same_as_from_tensors(isa):
    prob = make_problem(**CASES["qwen3_slice"], seed=25)
    gy = make_gy(prob)
    lora = make_lora(prob)
    results = []
    for fused in (False, True):
        state = make_state(prob, isa, lora=lora, fused=fused)
        results.append(check_state(state, prob, gy=gy, where=f"[{isa}/fused={fused}]"))
    (y0, g0, _, _), (y1, g1, _, _) = results
    assert torch.equal(y0, y1), "from_fused must give the same y as from_tensors"
    for name, a in grads_dict(g0).items():
        assert torch.equal(a, grads_dict(g1)[name]), f"from_fused must give the same grads.{name}"


def test_bf16_lora(isa):
    prob = make_problem(**CASES["awkward_T129"], seed=26, lora_dtype=torch.bfloat16)
    assert prob.lora["gate_a"].dtype == torch.bfloat16
    state = make_state(prob, isa)
    _, grads, _, _ = check_state(state, prob)
    for n, t in lora_tensors(grads.lora).items():
        assert to_torch(t).dtype == torch.float32, f"grads.lora.{n} must be float32"


def test_int32_ids_bf16_w(isa):
    prob = make_problem(**CASES["qwen3_slice"], seed=27, ids_dtype=torch.int32, w_dtype=torch.bfloat16)
    state = make_state(prob, isa)
    _, grads, _, _ = check_state(state, prob)
    assert grads.w.dtype == torch.bfloat16, "grads.w has w's dtype"
    # fp32 gy with bf16 x
    _, grads, _, _ = check_state(state, prob, gy=make_gy(prob, dtype=torch.float32))
    assert grads.x.dtype == torch.bfloat16, "grads.x has x's dtype"


def test_same_expert_twice_in_a_token(isa):
    """MATH.md sums over slots: a token may list the same expert in two slots."""
    prob = make_problem(**CASES["awkward_T7"], seed=34)
    ids = prob.ids.clone()
    ids[:, 1] = ids[:, 0]
    ids[3, 2] = ids[3, 0]  # three times
    state = make_state(prob, isa)
    check_state(state, prob, ids=ids, where=f"[{isa}/duplicate experts]")


def test_lora_b_zero_is_base_model(isa):
    """PEFT init (B = 0): y equals the no-LoRA reference; dA = 0; dB non-zero and correct."""
    prob = make_problem(**CASES["awkward_T129"], seed=28, lora_b_nonzero=False)
    state = make_state(prob, isa)
    y, grads, y_ref, g_ref = check_state(state, prob)
    y_base, _ = reference(prob, lora=None)
    assert rel_err(y, y_base) <= TOL
    gd = grads_dict(grads)
    for n in ("gate_a", "up_a", "down_a"):
        assert torch.all(gd[n] == 0), f"grads.lora.{n} must be 0 when B == 0"
    for n in ("gate_b", "up_b", "down_b"):
        assert gd[n].norm() > 0


def test_lora_init(isa):
    K = ktf()
    prob = make_problem(E=6, H=72, I=40, k=2, T=31, r=4, seed=29)
    weights = make_weights(prob)
    lora = K.LoRA.init(weights, rank=4, alpha=32.0, seed=0)
    assert lora.rank == 4 and lora.scale == pytest.approx(8.0)
    shapes = {"gate_a": (6, 4, 72), "gate_b": (6, 40, 4), "up_a": (6, 4, 72), "up_b": (6, 40, 4),
              "down_a": (6, 4, 40), "down_b": (6, 72, 4)}
    fan_in = {"gate_a": 72, "up_a": 72, "down_a": 40}
    for n, t in lora_tensors(lora).items():
        t = to_torch(t)
        assert tuple(t.shape) == shapes[n] and t.dtype == torch.float32, n
        if n in fan_in:
            bound = fan_in[n] ** -0.5
            assert t.abs().max() <= bound * (1 + 1e-6) and t.abs().max() > 0.5 * bound, n
            assert t.std() > 0.3 * bound, n
        else:
            assert torch.all(t == 0), n
    lora2 = K.LoRA.init(weights, rank=4, alpha=32.0, seed=0)
    lora3 = K.LoRA.init(weights, rank=4, alpha=32.0, seed=1)
    assert torch.equal(to_torch(lora.gate_a), to_torch(lora2.gate_a))
    assert not torch.equal(to_torch(lora.gate_a), to_torch(lora3.gate_a))
    state = K.MoEState(weights, lora, threads=2, isa=isa)
    check_state(state, prob, lora=lora)


def test_in_place_lora_update(isa):
    """After in-place updates of the LoRA tensors, the next call uses the new values."""
    prob = make_problem(**CASES["awkward_T129"], seed=30)
    lora = make_lora(prob)
    state = make_state(prob, isa, lora=lora)
    check_state(state, prob, lora=lora)
    gen = torch.Generator().manual_seed(1)
    before = {n: to_torch(t).clone() for n, t in lora_tensors(lora).items()}
    lora.gate_b.add_(torch.randn(lora.gate_b.shape, generator=gen) * 0.3)
    y_new, g_new = fwd_bwd(state, prob.x, prob.ids, prob.w, make_gy(prob))
    after = {n: to_torch(t) for n, t in lora_tensors(lora).items()}
    assert not torch.equal(before["gate_b"], after["gate_b"])
    y_old_ref, _ = reference(prob, lora=before)
    y_ref, g_ref = reference(prob, lora=lora, gy=make_gy(prob))
    assert rel_err(y_ref, y_old_ref) > 5 * TOL, "the update must change the output noticeably"
    assert_matches_reference(y_new, g_new, y_ref, g_ref, where=f"[{isa}/after gate_b.add_]")
    # every other tensor too
    for n in LORA_KEYS:
        if n != "gate_b":
            getattr(lora, n).mul_(0.5).add_(torch.randn(getattr(lora, n).shape, generator=gen) * 0.05)
    check_state(state, prob, lora=lora, where=f"[{isa}/after all add_]")


def test_nan_token_is_contained(isa):
    """NaN in one token's x stays in that token: others' y, dx, dw finite and correct."""
    prob = make_problem(**CASES["qwen3_slice"], seed=31)
    bad = 37
    x = prob.x.clone()
    x[bad, 5] = float("nan")
    state = make_state(prob, isa)
    gy = make_gy(prob)
    y, grads = fwd_bwd(state, x, prob.ids, prob.w, gy)
    y_ref, g_ref = reference(prob, x=x, gy=gy)
    keep = torch.arange(prob.T) != bad
    y, dx, dw = to_torch(y), to_torch(grads.x), to_torch(grads.w)
    for name, out, r in (("y", y, y_ref), ("dx", dx, g_ref["x"]), ("dw", dw, g_ref["w"])):
        assert torch.isfinite(out[keep]).all(), f"{name} of other tokens must stay finite"
        assert rel_err(out[keep], r[keep]) <= TOL, name
    assert not torch.isfinite(y[bad]).all()
    # the same state is still fine afterwards
    check_state(state, prob, gy=gy)


def test_deterministic_repeat(isa):
    prob = make_problem(**CASES["qwen3_slice"], seed=32)
    state = make_state(prob, isa)
    gy = make_gy(prob)
    runs = [fwd_bwd(state, prob.x, prob.ids, prob.w, gy) for _ in range(3)]
    y0, g0 = runs[0]
    for y, g in runs[1:]:
        assert torch.equal(y, y0), "same call must give bitwise identical y"
        for name, a in grads_dict(g).items():
            assert torch.equal(a, grads_dict(g0)[name]), f"same call must give bitwise identical grads.{name}"


def test_threads_do_not_change_results(isa):
    """threads=1 vs threads=2 (and 5: more partitions than cores or than 4): equal within
    fp32 rounding (fp32 inputs -> fp32 outputs)."""
    prob = make_problem(**CASES["qwen3_slice"], seed=33)
    x = prob.x.float()
    gy = make_gy(prob, dtype=torch.float32)
    lora = make_lora(prob)
    weights = make_weights(prob)
    out = {}
    for threads in (1, 2, 5):
        state = ktf().MoEState(weights, lora, threads=threads, isa=isa)
        y, g = fwd_bwd(state, x, prob.ids, prob.w, gy)
        out[threads] = {"y": y, **grads_dict(g)}
    for threads in (2, 5):
        for name, a in out[1].items():
            b = out[threads][name]
            assert a.dtype == torch.float32, name
            scale = a.abs().max().item()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m: f"threads={threads} vs 1, {name}: {m}")
