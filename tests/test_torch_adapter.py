"""The torch adapter (kt_functional.torch): the custom ops moe_forward / moe_backward (opcheck),
KTExperts' autograd gradients against the float32 reference (MATH.md tolerance 1e-2 on y, dx,
dw and every LoRA gradient), torch.compile, a directional-derivative check, optimizer steps,
the frozen router, the lifetime of forward residuals, a module without LoRA, bad input and
bf16 hidden states.

Shapes are small and awkward (E=6, H=72, I=40, T=13, k=3, r=4, plus T=1), with -1 slots and
experts that receive no token.
"""

from __future__ import annotations

import gc

import pytest
import torch

from helpers import LORA_KEYS, TOL, W_MAGNITUDE, grad_errors, ktf, make_problem, ref, rel_err

SHAPE = dict(E=6, H=72, I=40, k=3, r=4)
ERRORS = (ValueError, TypeError)


# ----------------------------------------------------------------------------- helpers
def _kt_torch():
    import kt_functional.torch as ktt  # noqa: PLC0415  (registers torch.ops.kt_functional)

    return ktt


def _problem(T=13, seed=11):
    """bf16 base weights (so the packed copy is exact), fp32 LoRA with nonzero B, -1 slots,
    one expert that receives no token; T=1 gets one -1 slot by hand."""
    if T == 1:
        prob = make_problem(**SHAPE, T=1, seed=seed, idle_experts=1)
        prob.ids[0, 1] = -1
    else:
        prob = make_problem(**SHAPE, T=T, seed=seed, unused_frac=0.3, all_unused_tokens=(4,), idle_experts=1)
    for name in ("gate", "up", "down"):  # bf16-representable base weights
        setattr(prob, name, getattr(prob, name).float().bfloat16().float())
    assert prob.idle, "the problem must have an expert with no token"
    assert (prob.ids < 0).any(), "the problem must have -1 slots"
    return prob


def _gy(prob, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(prob.T, prob.H, generator=gen).bfloat16().float()  # exact in bf16


def _module(prob, *, isa=None, lora=True, lora_dtype=torch.float32):
    """KTExperts on the problem's weights; with lora, its LoRA replaced by the problem's (B != 0)."""
    K = _kt_torch()
    weights = ktf().ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, threads=2)
    if not lora:
        return K.KTExperts(weights, lora_rank=None, threads=2, isa=isa)
    m = K.KTExperts(weights, lora_rank=prob.r, lora_alpha=prob.alpha, threads=2, isa=isa, lora_dtype=lora_dtype)
    m.set_lora({n: prob.lora[n].to(lora_dtype) for n in LORA_KEYS}, prob.alpha)
    return m


def _module_lora(m):
    return {n: getattr(m, n).detach().float() for n in LORA_KEYS}


def _reference(prob, m, x, w, gy):
    """(y_ref, grads_ref) of the float32 reference with the module's current LoRA (if any)."""
    lora = _module_lora(m) if m.lora_rank else None
    scale = m.lora_alpha / m.lora_rank if m.lora_rank else None
    args = (x.detach().float(), prob.ids, w.detach().float(), prob.gate, prob.up, prob.down, lora, scale)
    y_ref = ref.moe_reference(*args)
    g_ref = ref.moe_reference_grads(*args, gy)
    g_ref[W_MAGNITUDE] = ref.dw_magnitude(*args, gy)  # dw's error scale (MATH.md)
    return y_ref, g_ref


def _leaves(prob, x_dtype=torch.float32, w_grad=True):
    x = prob.x.to(x_dtype).detach().clone().requires_grad_(True)
    w = prob.w.detach().clone().requires_grad_(w_grad)
    return x, w


def _run(m, prob, x, w, gy):
    for t in (x, w, *m.parameters()):
        t.grad = None
    y = m(x, prob.ids, w)
    y.backward(gy.to(y.dtype))
    grads = {"x": x.grad, "w": w.grad}
    grads.update({n: getattr(m, n).grad for n in LORA_KEYS} if m.lora_rank else {})
    return y.detach(), grads


def _assert_close_to_reference(y, grads, y_ref, g_ref, where=""):
    errs = {"y": rel_err(y, y_ref)}
    present = {name: grads[name] for name in g_ref if name in grads}
    for name, g in present.items():
        assert g is not None, f"{where} {name}.grad is None"
    errs.update(grad_errors(present, g_ref))
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{where} errors above {TOL}: {bad} (all: {errs})"
    return errs


def _settle():
    gc.collect()
    gc.collect()


# ----------------------------------------------------------------------------- 1. opcheck
OPCHECK_CASES = {
    "lora_fp32_x_fp32": dict(lora_dtype=torch.float32, x_dtype=torch.float32, lora=True, T=13),
    "lora_bf16_x_bf16": dict(lora_dtype=torch.bfloat16, x_dtype=torch.bfloat16, lora=True, T=13),
    "lora_fp32_x_bf16_T1": dict(lora_dtype=torch.float32, x_dtype=torch.bfloat16, lora=True, T=1),
    # Regression: the autograd formula must return [] (not None) for the empty `lora` list, else
    # torch rejects the backward ("Expected the return from backward to be of the same structure
    # as the inputs") and test_aot_dispatch_dynamic fails.
    "no_lora_x_fp32": dict(lora_dtype=None, x_dtype=torch.float32, lora=False, T=13),
    "no_lora_x_bf16": dict(lora_dtype=None, x_dtype=torch.bfloat16, lora=False, T=13),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_forward_op(case):
    c = OPCHECK_CASES[case]
    prob = _problem(T=c["T"])
    m = _module(prob, lora=c["lora"], lora_dtype=c["lora_dtype"] or torch.float32)
    lora = [t for t in m.lora_tensors()]
    assert all(t.requires_grad for t in lora)
    x, w = _leaves(prob, c["x_dtype"])
    result = torch.library.opcheck(
        torch.ops.kt_functional.moe_forward.default, (x, prob.ids, w, lora, m._layer, m.lora_alpha, True))
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_backward_op_direct():
    """The backward op called on real residuals gives [dx, dw, *dlora] in the inputs' dtypes,
    equal to the reference."""
    prob = _problem()
    m = _module(prob)
    lora = [t.detach() for t in m.lora_tensors()]
    gy = _gy(prob)
    y, res = torch.ops.kt_functional.moe_forward(prob.x, prob.ids, prob.w, lora, m._layer, m.lora_alpha, True)
    assert res.dtype == torch.int64 and tuple(res.shape) == (1,)
    out = torch.ops.kt_functional.moe_backward(res, gy, prob.x, prob.w, lora)
    assert len(out) == 2 + len(LORA_KEYS)
    assert out[0].dtype == prob.x.dtype and out[1].dtype == prob.w.dtype
    grads = dict(zip(["x", "w", *LORA_KEYS], out))
    for n, t in zip(LORA_KEYS, lora):
        assert grads[n].dtype == t.dtype and grads[n].shape == t.shape, n
    y_ref, g_ref = _reference(prob, m, prob.x, prob.w, gy)
    _assert_close_to_reference(y, grads, y_ref, g_ref, where="[moe_backward op]")


# ----------------------------------------------------------------------------- 2. autograd vs reference
@pytest.mark.parametrize("T", [13, 1])
def test_autograd_matches_reference(isa, T):
    prob = _problem(T=T, seed=20 + T)
    m = _module(prob, isa=isa)
    assert m._state.isa == isa
    x, w = _leaves(prob)
    gy = _gy(prob)
    y, grads = _run(m, prob, x, w, gy)
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    assert set(g_ref) == {"x", "w", *LORA_KEYS, W_MAGNITUDE}
    for name, g in g_ref.items():  # B != 0: every gradient is non-trivial
        assert torch.linalg.vector_norm(g) > 0, f"reference grad {name} is zero: the test would be vacuous"
    _assert_close_to_reference(y, grads, y_ref, g_ref, where=f"[{isa}/T={T}]")
    for e in prob.idle:
        for n in LORA_KEYS:
            assert torch.all(grads[n][e] == 0), f"{n}.grad[{e}] of an idle expert must be 0"
    for t in (4,) if T > 1 else ():
        assert torch.all(y[t] == 0) and torch.all(grads["x"][t] == 0), "token with all slots -1"


# ----------------------------------------------------------------------------- 3. torch.compile
def test_compile_matches_eager():
    prob = _problem()
    m = _module(prob)
    gy = _gy(prob)
    x, w = _leaves(prob)
    y_e, g_e = _run(m, prob, x, w, gy)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True)
    for _ in range(2):  # the second call reuses the compiled graph
        y_c, g_c = _run(cm, prob, x, w, gy)
        assert y_c.dtype == y_e.dtype and y_c.shape == y_e.shape
        assert torch.allclose(y_c, y_e, rtol=1e-6, atol=1e-6), (y_c - y_e).abs().max()
        assert set(g_c) == set(g_e)
        for name in g_e:
            assert g_c[name] is not None, name
            assert torch.allclose(g_c[name], g_e[name], rtol=1e-6, atol=1e-6), (name, (g_c[name] - g_e[name]).abs().max())


# ----------------------------------------------------------------------------- 4. directional derivative
def test_directional_derivative_matches_autograd():
    """Gradient check by directional derivatives of the kt ops themselves.

    torch.autograd.gradcheck compares against fp64 finite differences with eps ~ 1e-6 and tight
    tolerances. The kernels round x, the base weights and intermediates (g, u, h) to bf16
    (8-bit mantissa), so an fp64 perturbation of 1e-6 is lost in rounding and the finite
    difference is noise; gradcheck would fail (or need tolerances so loose it checks nothing).

    Instead, for L(p) = <moe_experts(..., p), gy> and each of the six fp32 LoRA tensors and w, the
    central difference (L(p + eps v) - L(p - eps v)) / (2 eps), with a perturbation of 2% of
    ||p||, is compared with <p.grad, v> from autograd (the kernels' backward) within 5% relative.
    v = unit(p.grad) + unit(random): half of it along the analytic gradient, so <p.grad, v> is
    large compared to the bf16 rounding noise of L, and a wrong gradient (wrong scale, sign,
    expert or transposition) changes <p.grad, v> but not the finite difference. x is not
    perturbed: the kernels round it to bf16, so small steps in x are not seen.
    """
    K = _kt_torch()
    prob = _problem(seed=5)
    m = _module(prob)
    gy = _gy(prob)
    x = prob.x.float()
    base = {n: prob.lora[n].detach().clone() for n in LORA_KEYS}
    base["w"] = prob.w.detach().clone()

    def loss(p):
        y = K.moe_experts(x, prob.ids, p["w"], m._layer, [p[n] for n in LORA_KEYS], m.lora_alpha)
        return (y.float() * gy).sum()

    leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    loss(leaves).backward()
    grads = {n: t.grad for n, t in leaves.items()}

    gen = torch.Generator().manual_seed(2024)
    eps = 2e-2
    errs = {}
    for name in [*LORA_KEYS, "w"]:
        g = grads[name]
        assert torch.linalg.vector_norm(g) > 0, name
        r = torch.randn(base[name].shape, generator=gen)
        v = g / g.norm() + r / r.norm()
        v = v * (base[name].norm() / v.norm())
        with torch.no_grad():
            lp = loss({**base, name: base[name] + eps * v})
            lm = loss({**base, name: base[name] - eps * v})
        fd = ((lp - lm) / (2 * eps)).item()
        an = (g * v).sum().item()
        errs[name] = abs(fd - an) / abs(an)
    bad = {k: v for k, v in errs.items() if not v <= 5e-2}
    assert not bad, f"directional derivative vs autograd above 5e-2: {bad} (all: {errs})"


# ----------------------------------------------------------------------------- 5. optimizer / in-place
def test_optimizer_step_is_seen_by_next_forward():
    prob = _problem(seed=31)
    m = _module(prob)
    gy = _gy(prob)
    x, w = _leaves(prob)
    y0, _ = _run(m, prob, x, w, gy)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    opt.step()
    with torch.no_grad():
        y1 = m(x, prob.ids, w)
    assert not torch.equal(y1, y0), "the optimizer's in-place step must change the next forward"
    # a fresh module built from the updated tensors gives the same output
    fresh = _module(prob)
    fresh.set_lora({n: getattr(m, n).detach() for n in LORA_KEYS}, m.lora_alpha)
    with torch.no_grad():
        y_fresh = fresh(x, prob.ids, w)
    assert torch.allclose(y1, y_fresh, rtol=1e-6, atol=1e-6)
    # and both match the reference with the updated LoRA, gradients included
    y2, grads = _run(m, prob, x, w, gy)
    assert torch.equal(y2, y1)
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    _assert_close_to_reference(y2, grads, y_ref, g_ref, where="[after AdamW step]")


def test_inplace_lora_change_between_forward_and_backward_raises():
    prob = _problem(seed=32)
    m = _module(prob)
    gy = _gy(prob)
    x, w = _leaves(prob)
    _run(m, prob, x, w, gy)  # grads for the optimizer
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    y = m(x, prob.ids, w)
    opt.step()  # modifies the LoRA tensors the forward used
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)modif"):
        y.backward(gy)
    del y
    # a plain in-place edit of one tensor is caught too
    y = m(x, prob.ids, w)
    with torch.no_grad():
        m.down_b.mul_(0.5)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)modif"):
        y.backward(gy)
    del y
    # the module stays usable and correct
    y, grads = _run(m, prob, x, w, gy)
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    _assert_close_to_reference(y, grads, y_ref, g_ref, where="[after the in-place error]")


# ----------------------------------------------------------------------------- 6. frozen router
def test_frozen_router():
    prob = _problem(seed=41)
    m = _module(prob)
    gy = _gy(prob)
    x, w = _leaves(prob, w_grad=False)
    y, grads = _run(m, prob, x, w, gy)
    assert w.grad is None, "top_k_weights does not require grad: it must get no grad"
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    del g_ref["w"], grads["w"]
    _assert_close_to_reference(y, grads, y_ref, g_ref, where="[frozen router]")

    # the router requires grad: w.grad matches the reference dw
    x, w = _leaves(prob, w_grad=True)
    y, grads = _run(m, prob, x, w, gy)
    assert w.grad is not None and w.grad.dtype == w.dtype
    _, g_ref = _reference(prob, m, x, w, gy)
    assert grad_errors({"w": w.grad}, g_ref)["w"] <= TOL
    assert torch.all(w.grad[prob.ids < 0] == 0), "dw at -1 slots must be 0"

    # only the router requires grad (frozen LoRA, frozen x)
    for p in m.parameters():
        p.requires_grad_(False)
        p.grad = None
    x = prob.x.float()
    w = prob.w.clone().requires_grad_(True)
    y = m(x, prob.ids, w)
    y.backward(gy)
    assert x.grad is None and all(p.grad is None for p in m.parameters())
    assert grad_errors({"w": w.grad}, g_ref)["w"] <= TOL


# ----------------------------------------------------------------------------- 7. residuals lifetime
def test_residuals_lifetime_and_second_backward():
    K = _kt_torch()
    prob = _problem(seed=51)
    m = _module(prob)
    gy = _gy(prob)
    x, w = _leaves(prob)
    _settle()
    # other tests' failures may keep their frames (and residuals) alive: count relative to now
    before = K.live_residuals()

    with torch.no_grad():
        y = m(x, prob.ids, w)
    assert K.live_residuals() == before, "no residuals may be saved under torch.no_grad()"
    del y
    frozen = _module(prob, lora=False)
    y = frozen(prob.x, prob.ids, prob.w)  # nothing requires grad
    assert not y.requires_grad
    assert K.live_residuals() == before, "no residuals may be saved when nothing requires grad"
    del y

    y = m(x, prob.ids, w)
    count, nbytes = K.live_residuals()
    assert count == before[0] + 1 and nbytes > before[1], (before, (count, nbytes))
    y.backward(gy)
    assert K.live_residuals() == before, "the backward must consume the residuals"
    del y
    _settle()
    assert K.live_residuals() == before

    # dropping y without a backward frees them too
    y = m(x, prob.ids, w)
    assert K.live_residuals()[0] == before[0] + 1
    del y
    _settle()
    assert K.live_residuals() == before

    # a second backward through the same graph
    y = m(x, prob.ids, w)
    y.backward(gy, retain_graph=True)
    with pytest.raises(RuntimeError, match=r"already used by a backward"):
        y.backward(gy)
    del y
    _settle()
    assert K.live_residuals() == before
    # the module still works
    y, grads = _run(m, prob, x, w, gy)
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    _assert_close_to_reference(y, grads, y_ref, g_ref, where="[after a second backward]")


# ----------------------------------------------------------------------------- 8. no LoRA
@pytest.mark.parametrize("T", [13, 1])
def test_no_lora_module(T):
    prob = _problem(T=T, seed=61 + T)
    m = _module(prob, lora=False)
    assert m.lora_rank == 0 and m.lora_tensors() == [] and list(m.parameters()) == []
    gy = _gy(prob)
    x, w = _leaves(prob)
    with torch.no_grad():
        y = m(x, prob.ids, w)
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    assert set(g_ref) == {"x", "w", W_MAGNITUDE}
    assert rel_err(y, y_ref) <= TOL
    # Regression: the backward of a lora_rank=None KTExperts once failed with "Expected the return
    # from backward to be of the same structure as the inputs" (None returned for the empty list).
    y, grads = _run(m, prob, x, w, gy)
    _assert_close_to_reference(y, grads, y_ref, g_ref, where=f"[no LoRA, T={T}]")


# ----------------------------------------------------------------------------- 9. bad input
def test_bad_input_names_the_argument():
    prob = _problem(seed=71)
    m = _module(prob)
    x, w = _leaves(prob)
    ids = prob.ids
    bad_ids = ids.clone()
    bad_ids[0, 0] = -2
    cases = [
        ("x", lambda: m(torch.zeros(prob.T, prob.H + 8, requires_grad=True), ids, w)),  # wrong hidden size
        ("x", lambda: m(x.detach().int(), ids, w)),
        ("ids", lambda: m(x, bad_ids, w)),  # below -1
        ("ids", lambda: m(x, ids.float(), w)),
        ("w", lambda: m(x, ids, w[:, :2])),  # k of the weights != k of the ids
        ("w", lambda: m(x, ids[:, :2], w)),
    ]
    for name, call in cases:
        with pytest.raises(ERRORS, match=rf"^{name}:"):
            call()
    _settle()
    # the module works afterwards
    gy = _gy(prob)
    y, grads = _run(m, prob, x, w, gy)
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    _assert_close_to_reference(y, grads, y_ref, g_ref, where="[after bad input]")


# ----------------------------------------------------------------------------- 10. bf16 hidden states
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_bf16_hidden_states(lora_dtype):
    prob = _problem(seed=81)
    m = _module(prob, lora_dtype=lora_dtype)
    gy = _gy(prob)
    x, w = _leaves(prob, x_dtype=torch.bfloat16)
    y, grads = _run(m, prob, x, w, gy)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert w.grad.dtype == torch.float32
    for n in LORA_KEYS:
        assert getattr(m, n).grad.dtype == lora_dtype, n
    y_ref, g_ref = _reference(prob, m, x, w, gy)
    _assert_close_to_reference(y, grads, y_ref, g_ref, where=f"[bf16 x, LoRA {lora_dtype}]")


# ----------------------------------------------------------------------------- 1b. opcheck of the backward op
# test_aot_dispatch_dynamic runs the op twice (eager, then compiled) on one residuals tensor, but a
# forward's residuals are consumed by exactly one backward by design; the forward op's
# test_aot_dispatch_dynamic (above) already runs this backward through AOTDispatcher.
@pytest.mark.parametrize("test_util", ["test_schema", "test_autograd_registration", "test_faketensor"])
def test_opcheck_backward_op(test_util):
    # opcheck passes deep copies of the inputs: the residuals copy must still find its cache.
    prob = _problem()
    m = _module(prob)
    lora = [t.detach() for t in m.lora_tensors()]
    _, res = torch.ops.kt_functional.moe_forward(prob.x, prob.ids, prob.w, lora, m._layer, m.lora_alpha, True)
    result = torch.library.opcheck(torch.ops.kt_functional.moe_backward.default,
                                   (res, _gy(prob), prob.x, prob.w, lora), test_utils=test_util)
    assert result == {test_util: "SUCCESS"}, result
