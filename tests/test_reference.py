"""The float32 reference against an independent, slow, per-token float64 loop written line by
line from MATH.md (forward AND the hand-written backward formulas), plus make_problem, rel_err
and the two plain-torch peers.  Needs only torch: runs before the library builds."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import LORA_KEYS, TOL, make_gy, make_problem, ref, rel_err

REF_TOL = 1e-5  # float32 reference vs float64 loop


# ----------------------------------------------------------------------------- slow loop
def _silu(z):
    return z * torch.sigmoid(z)


def _dsilu(z):
    sg = torch.sigmoid(z)
    return sg * (1 + z * (1 - sg))


def slow_moe(prob, gy=None, lora=True):
    """MATH.md literally, one (token, slot) pair at a time, float64.  Returns (y, grads)."""
    d = torch.float64
    x, w = prob.x.to(d), prob.w.to(d)
    ids = prob.ids.to(torch.int64)
    Wg, Wu, Wd = prob.gate.to(d), prob.up.to(d), prob.down.to(d)
    T, H = x.shape
    k = ids.shape[1]
    s = prob.scale if lora else 0.0
    L = {n: prob.lora[n].to(d) for n in LORA_KEYS}
    if not lora:
        L = {n: torch.zeros_like(t) for n, t in L.items()}
    Ag, Bg, Au, Bu, Ad, Bd = (L[n] for n in LORA_KEYS)
    y = torch.zeros(T, H, dtype=d)
    dx = torch.zeros(T, H, dtype=d)
    dw = torch.zeros(T, k, dtype=d)
    dL = {n: torch.zeros_like(t) for n, t in L.items()}
    gyd = gy.to(d) if gy is not None else None
    for t in range(T):
        xt = x[t]
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            # forward
            a_g = Ag[e] @ xt
            a_u = Au[e] @ xt
            g = Wg[e] @ xt + s * (Bg[e] @ a_g)
            u = Wu[e] @ xt + s * (Bu[e] @ a_u)
            h = _silu(g) * u
            a_d = Ad[e] @ h
            o = Wd[e] @ h + s * (Bd[e] @ a_d)
            y[t] += w[t, j] * o
            if gyd is None:
                continue
            # backward (MATH.md "Backward")
            gt = gyd[t]
            dh_raw = Wd[e].T @ gt + s * (Ad[e].T @ (Bd[e].T @ gt))
            dw[t, j] = dh_raw @ h
            dh = w[t, j] * dh_raw
            dg = dh * u * _dsilu(g)
            du = dh * _silu(g)
            dx[t] += Wg[e].T @ dg + s * (Ag[e].T @ (Bg[e].T @ dg)) + Wu[e].T @ du + s * (Au[e].T @ (Bu[e].T @ du))
            wg = w[t, j] * gt
            dL["down_b"][e] += s * torch.outer(wg, a_d)
            dL["down_a"][e] += s * torch.outer(Bd[e].T @ wg, h)
            dL["gate_b"][e] += s * torch.outer(dg, a_g)
            dL["gate_a"][e] += s * torch.outer(Bg[e].T @ dg, xt)
            dL["up_b"][e] += s * torch.outer(du, a_u)
            dL["up_a"][e] += s * torch.outer(Bu[e].T @ du, xt)
    grads = None
    if gyd is not None:
        grads = {"x": dx, "w": dw}
        if lora:
            grads.update(dL)
    return y, grads


SLOW_CASES = {
    "basic": dict(E=4, H=24, I=16, k=2, T=9, r=3, seed=0),
    "awkward": dict(E=5, H=72, I=40, k=3, T=7, r=3, seed=1),
    "top1": dict(E=6, H=20, I=12, k=1, T=11, r=2, seed=2),
    "single_expert": dict(E=1, H=20, I=12, k=1, T=5, r=2, seed=3),
    "idle_and_unused": dict(
        E=7, H=24, I=20, k=2, T=13, r=4, seed=4, idle_experts=3, unused_frac=0.3, all_unused_tokens=(0, 6)
    ),
    "fp32_bf16lora": dict(E=3, H=16, I=8, k=2, T=6, r=2, seed=5, dtype=torch.float32, lora_dtype=torch.bfloat16),
}


def _run_reference(prob, gy, lora=True):
    L = prob.lora if lora else None
    s = prob.scale if lora else None
    y = ref.moe_reference(prob.x, prob.ids, prob.w, prob.gate, prob.up, prob.down, L, s)
    g = ref.moe_reference_grads(prob.x, prob.ids, prob.w, prob.gate, prob.up, prob.down, L, s, gy)
    return y, g


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "nolora"])
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_reference_matches_slow_loop(case, lora):
    prob = make_problem(**SLOW_CASES[case])
    gy = make_gy(prob)
    y, g = _run_reference(prob, gy, lora)
    y_slow, g_slow = slow_moe(prob, gy, lora)
    assert y.dtype == torch.float32 and y.shape == (prob.T, prob.H)
    assert rel_err(y, y_slow) <= REF_TOL
    assert set(g) == set(g_slow)
    for name in g_slow:
        assert g[name].dtype == torch.float32
        assert g[name].shape == g_slow[name].shape, name
        assert rel_err(g[name], g_slow[name]) <= REF_TOL, name
    # the forward is not trivially zero and the LoRA terms matter
    assert y.norm() > 0
    if lora:
        y_nolora = ref.moe_reference(prob.x, prob.ids, prob.w, prob.gate, prob.up, prob.down)
        assert rel_err(y_nolora, y) > 0.1, "LoRA terms should change the output noticeably"
        for name in LORA_KEYS:
            assert g[name].norm() > 0, f"gradient of {name} should be non-trivial"


def test_reference_unused_slots_and_idle_experts():
    prob = make_problem(**SLOW_CASES["idle_and_unused"])
    gy = make_gy(prob)
    y, g = _run_reference(prob, gy)
    for t in (0, 6):
        assert torch.all(y[t] == 0) and torch.all(g["x"][t] == 0)
    unused = prob.ids < 0
    assert unused.any()
    assert torch.all(g["w"][unused] == 0)
    for e in prob.idle:
        for name in LORA_KEYS:
            assert torch.all(g[name][e] == 0)
    # w at unused slots is ignored
    w2 = prob.w.clone()
    w2[unused] = 123.0
    y2 = ref.moe_reference(prob.x, prob.ids, w2, prob.gate, prob.up, prob.down, prob.lora, prob.scale)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "nolora"])
def test_reference_pairs_give_dw_and_its_bound(lora):
    """h and dh_raw written from MATH.md's formulas give autograd's dw (dw = dh_raw . h), and
    m = sum |dh_raw| |h| bounds |dw| (0 at -1 slots)."""
    prob = make_problem(**SLOW_CASES["idle_and_unused"])
    gy = make_gy(prob)
    L, s = (prob.lora, prob.scale) if lora else (None, None)
    args = (prob.x, prob.ids, prob.w, prob.gate, prob.up, prob.down, L, s, gy)
    _, g = _run_reference(prob, gy, lora)
    h, dh_raw = ref.moe_reference_pairs(*args)
    assert h.shape == dh_raw.shape == (prob.T, prob.k, prob.I)
    dw = (dh_raw * h).sum(-1)
    assert rel_err(dw, g["w"]) <= 1e-5
    m = ref.dw_magnitude(*args)
    unused = prob.ids < 0
    assert torch.all(m[unused] == 0) and torch.all(m[~unused] > 0)
    assert torch.all(g["w"].abs() <= m * (1 + 1e-5))
    assert ref.dw_err(g["w"], g["w"], m) == 0 and ref.dw_err(g["w"] + m, g["w"], m) == pytest.approx(1.0)


def test_reference_empty_batch():
    prob = make_problem(E=4, H=16, I=8, k=2, T=0, r=2, seed=0)
    gy = make_gy(prob)
    y, g = _run_reference(prob, gy)
    assert y.shape == (0, 16)
    assert g["x"].shape == (0, 16) and g["w"].shape == (0, 2)
    for name in LORA_KEYS:
        assert g[name].shape == prob.lora[name].shape and torch.all(g[name] == 0)


def test_reference_rejects_bad_ids():
    prob = make_problem(E=4, H=16, I=8, k=2, T=3, r=2, seed=0)
    ids = prob.ids.clone()
    ids[1, 0] = -2
    with pytest.raises(ValueError, match="ids"):
        ref.moe_reference(prob.x, ids, prob.w, prob.gate, prob.up, prob.down)


def test_reference_skips_sentinel_ids():
    """ids >= E (expert-parallel sentinels, MATH.md) contribute nothing, like -1."""
    prob = make_problem(E=4, H=16, I=8, k=2, T=3, r=2, seed=0)
    sentinel, unused = prob.ids.clone(), prob.ids.clone()
    sentinel[1, 0], unused[1, 0] = 4, -1
    y_s = ref.moe_reference(prob.x, sentinel, prob.w, prob.gate, prob.up, prob.down)
    y_u = ref.moe_reference(prob.x, unused, prob.w, prob.gate, prob.up, prob.down)
    assert torch.equal(y_s, y_u)


def test_reference_accepts_lora_object_and_numpy():
    prob = make_problem(E=3, H=16, I=8, k=2, T=4, r=2, seed=9, dtype=torch.float32)

    class Obj:
        pass

    obj = Obj()
    for n in LORA_KEYS:
        setattr(obj, n, prob.lora[n])
    obj.scale = prob.scale
    y1 = ref.moe_reference(prob.x, prob.ids, prob.w, prob.gate, prob.up, prob.down, prob.lora, prob.scale)
    y2 = ref.moe_reference(prob.x.numpy(), prob.ids.numpy(), prob.w.numpy(), prob.gate, prob.up, prob.down, obj)
    assert torch.equal(y1, y2)


# ----------------------------------------------------------------------------- rel_err
def test_rel_err():
    a = torch.tensor([3.0, 4.0])
    assert rel_err(a, a) == 0.0
    assert rel_err(torch.tensor([3.0, 5.0]), a) == pytest.approx(1 / 5)
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.tensor([0.0, 2.0]), torch.zeros(2)) == pytest.approx(2.0)
    assert rel_err(a.to(torch.bfloat16), a) == 0.0
    assert rel_err(torch.zeros(0, 4), torch.zeros(0, 4)) == 0.0
    with pytest.raises(ValueError):
        rel_err(torch.zeros(2), torch.zeros(3))


# ----------------------------------------------------------------------------- make_problem
def test_make_problem_properties():
    p = make_problem(E=10, H=40, I=24, k=3, T=50, r=4, seed=7, idle_experts=4, unused_frac=0.2, all_unused_tokens=(3,))
    assert p.x.shape == (50, 40) and p.x.dtype == torch.bfloat16
    assert p.gate.shape == p.up.shape == (10, 24, 40) and p.down.shape == (10, 40, 24)
    assert p.gate.dtype == torch.bfloat16
    assert torch.equal(p.gate_up[:, :24], p.gate) and torch.equal(p.gate_up[:, 24:], p.up)
    assert p.ids.shape == (50, 3) and p.ids.dtype == torch.int64
    assert p.w.shape == (50, 3) and p.w.dtype == torch.float32
    assert torch.all(p.w > 0)
    assert torch.allclose(p.w.sum(1), torch.ones(50))
    assert len(p.idle) == 4
    routed = p.ids[p.ids >= 0]
    assert routed.min() >= 0 and routed.max() < 10
    assert not set(routed.tolist()) & set(p.idle)
    assert torch.all(p.ids[3] == -1)
    assert (p.ids == -1).sum() > 3
    for t in range(50):
        row = p.ids[t][p.ids[t] >= 0].tolist()
        assert len(row) == len(set(row)), "experts of a token must be distinct"
    shapes = {"gate_a": (10, 4, 40), "gate_b": (10, 24, 4), "up_a": (10, 4, 40), "up_b": (10, 24, 4),
              "down_a": (10, 4, 24), "down_b": (10, 40, 4)}
    for n, sh in shapes.items():
        assert p.lora[n].shape == sh and p.lora[n].dtype == torch.float32
        assert p.lora[n].abs().min() >= 0 and p.lora[n].norm() > 0
    assert p.scale == p.alpha / p.r
    # realistic scale: intermediates O(1)
    assert 0.5 < p.gate.float().std().item() * math.sqrt(40) < 2.0
    # deterministic by seed
    q = make_problem(E=10, H=40, I=24, k=3, T=50, r=4, seed=7, idle_experts=4, unused_frac=0.2, all_unused_tokens=(3,))
    assert torch.equal(p.x, q.x) and torch.equal(p.ids, q.ids) and torch.equal(p.lora["up_b"], q.lora["up_b"])
    z = make_problem(E=4, H=8, I=8, k=2, T=3, r=2, seed=0, lora_b_nonzero=False, ids_dtype=torch.int32,
                     w_dtype=torch.bfloat16)
    for n in ("gate_b", "up_b", "down_b"):
        assert torch.all(z.lora[n] == 0)
    assert z.ids.dtype == torch.int32 and z.w.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- peers
PEERS = {"eager_loop": ref.eager_loop_moe, "grouped_mm": ref.grouped_mm_moe}
PEER_CASES = {
    "qwen3_slice": dict(E=16, H=256, I=96, k=8, T=64, r=16, seed=11),
    "awkward": dict(E=5, H=72, I=40, k=3, T=129, r=3, seed=12),
    "unused_idle": dict(E=8, H=64, I=48, k=2, T=96, r=4, seed=13, idle_experts=2, unused_frac=0.25,
                        all_unused_tokens=(5,)),
}


def _peer_fwd_bwd(peer, prob, gy, lora=True):
    x = prob.x.clone().requires_grad_(True)
    w = prob.w.clone().requires_grad_(True)
    L = {n: t.clone().requires_grad_(True) for n, t in prob.lora.items()} if lora else None
    y = peer(x, prob.ids, w, prob.gate, prob.up, prob.down, L, prob.scale if lora else None)
    y.backward(gy)
    grads = {"x": x.grad, "w": w.grad}
    if lora:
        grads.update({n: L[n].grad for n in LORA_KEYS})
    return y, grads


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "nolora"])
@pytest.mark.parametrize("case", list(PEER_CASES))
@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_matches_reference(peer, case, lora):
    prob = make_problem(**PEER_CASES[case])
    gy = make_gy(prob)
    y, g = _peer_fwd_bwd(PEERS[peer], prob, gy, lora)
    y_ref, g_ref = _run_reference(prob, gy, lora)
    assert y.dtype == prob.x.dtype and y.shape == y_ref.shape
    errs = {"y": rel_err(y, y_ref)}
    for name, r in g_ref.items():
        assert g[name] is not None, name
        errs[name] = rel_err(g[name], r)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{peer} off the reference: {bad} (all {errs})"


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_empty_and_all_unused(peer):
    prob = make_problem(E=4, H=16, I=8, k=2, T=0, r=2, seed=0)
    y, g = _peer_fwd_bwd(PEERS[peer], prob, make_gy(prob))
    assert y.shape == (0, 16)
    prob = make_problem(E=4, H=16, I=8, k=2, T=3, r=2, seed=0, all_unused_tokens=(0, 1, 2))
    y, g = _peer_fwd_bwd(PEERS[peer], prob, make_gy(prob))
    assert torch.all(y == 0) and torch.all(g["x"] == 0)


def test_grouped_mm_available_on_cpu():
    """The grouped_mm peer really uses torch._grouped_mm in this torch (2.13 CPU)."""
    assert ref.HAS_GROUPED_MM
    a = torch.randn(10, 16, dtype=torch.bfloat16)
    b = torch.randn(3, 16, 8, dtype=torch.bfloat16)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    out = ref._gmm(a, b, offs)
    expect = torch.cat([a[:3] @ b[0], a[3:10] @ b[2]])
    assert torch.equal(out, expect)
    # unaligned sizes go through zero padding and give the same product
    a = torch.randn(10, 7, dtype=torch.bfloat16)
    b = torch.randn(3, 7, 5, dtype=torch.bfloat16)
    out = ref._gmm(a, b, offs)
    expect = torch.cat([a[:3].float() @ b[0].float(), a[3:10].float() @ b[2].float()])
    assert rel_err(out, expect) <= TOL
