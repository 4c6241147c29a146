"""Cache semantics: consumed once, many alive at once (gradient accumulation, any order),
bound to its state, and its memory freed when consumed or garbage-collected."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    TOL,
    assert_matches_reference,
    grads_dict,
    ktf,
    make_gy,
    make_problem,
    make_state,
    reference,
    rel_err,
    rss_bytes,
    settle,
)

MB = 1 << 20


@pytest.fixture(scope="module")
def prob():
    return make_problem(E=6, H=72, I=40, k=3, T=29, r=3, seed=41)


def _batches(prob, n):
    """n different (x, ids, w, gy) batches for the problem's weights and LoRA."""
    out = []
    for i in range(n):
        p = make_problem(prob.E, prob.H, prob.I, prob.k, prob.T, prob.r, seed=1000 + i)
        out.append((p.x, p.ids, p.w, make_gy(p, seed=i)))
    return out


def test_cache_consumed_once(prob):
    K = ktf()
    state = make_state(prob)
    gy = make_gy(prob)
    y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
    grads = K.moe_backward(state, cache, gy)
    y_ref, g_ref = reference(prob, gy=gy)
    assert_matches_reference(y, grads, y_ref, g_ref)
    with pytest.raises(ValueError, match=r"\bcache\b"):
        K.moe_backward(state, cache, gy)


def test_lora_modified_between_forward_and_backward(prob):
    """A backward must not silently mix LoRA values: an in-place update after the forward is an
    error that leaves the cache usable once the values are restored."""
    K = ktf()
    state = make_state(prob)
    gy = make_gy(prob)
    y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
    saved = state.lora.down_b.clone()
    state.lora.down_b.add_(1.0)
    with pytest.raises(ValueError, match=r"lora"):
        K.moe_backward(state, cache, gy)
    assert not cache.consumed
    state.lora.down_b.copy_(saved)  # another in-place write: the version still differs
    with pytest.raises(ValueError, match=r"lora"):
        K.moe_backward(state, cache, gy)
    y2, cache2 = K.moe_forward(state, prob.x, prob.ids, prob.w)
    y_ref, g_ref = reference(prob, gy=gy)
    assert_matches_reference(y2, K.moe_backward(state, cache2, gy), y_ref, g_ref)


def test_save_for_backward_false(prob):
    K = ktf()
    state = make_state(prob)
    y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    assert cache is None
    y_ref, _ = reference(prob)
    assert rel_err(y, y_ref) <= TOL


@pytest.mark.parametrize("order", [(2, 0, 1), (0, 1, 2), (1, 2, 0)], ids=str)
def test_many_caches_alive(isa, prob, order):
    """3 forwards, then the 3 backwards in any order: each correct, and the summed LoRA
    gradients equal those of the concatenated batch (gradient accumulation)."""
    K = ktf()
    state = make_state(prob, isa)
    batches = _batches(prob, 3)
    fwd = [K.moe_forward(state, x, ids, w) for x, ids, w, _ in batches]
    grads = {}
    for i in order:
        grads[i] = K.moe_backward(state, fwd[i][1], batches[i][3])
    total = None
    for i, (x, ids, w, gy) in enumerate(batches):
        y_ref, g_ref = reference(prob, x=x, ids=ids, w=w, gy=gy)
        assert_matches_reference(fwd[i][0], grads[i], y_ref, g_ref, where=f"[{isa}/batch {i}]")
        gd = grads_dict(grads[i])
        total = gd if total is None else {n: total[n] + gd[n] for n in total}
    cat = lambda j: torch.cat([b[j] for b in batches])  # noqa: E731
    _, g_cat = reference(prob, x=cat(0), ids=cat(1), w=cat(2), gy=cat(3))
    for n in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"):
        assert rel_err(total[n], g_cat[n]) <= TOL, f"accumulated grads.lora.{n}"


def test_foreign_cache_rejected_and_kept(prob):
    """A cache used with another state -> ValueError; the cache still works with its own."""
    K = ktf()
    a = make_state(prob)
    b = make_state(prob)  # same weights and values, but another state
    gy = make_gy(prob)
    y, cache = K.moe_forward(a, prob.x, prob.ids, prob.w)
    with pytest.raises(ValueError, match=r"\bcache\b"):
        K.moe_backward(b, cache, gy)
    grads = K.moe_backward(a, cache, gy)
    y_ref, g_ref = reference(prob, gy=gy)
    assert_matches_reference(y, grads, y_ref, g_ref)


# ----------------------------------------------------------------------------- memory
# Big enough that one leaked cache per iteration (even one holding only a bf16 copy of x,
# 1 MiB here) is far above the slack; the routed activations are several MiB more.
MEM_SHAPE = dict(E=16, H=256, I=64, k=8, T=2048, r=4)
MEM_ITERS = 40
MEM_SLACK = 20 * MB


@pytest.fixture(scope="module")
def mem_prob():
    return make_problem(**MEM_SHAPE, seed=43)


def _growth(step, iters=MEM_ITERS, warmup=3):
    for _ in range(warmup):
        step()
    settle()
    base = rss_bytes()
    for _ in range(iters):
        step()
    settle()
    return rss_bytes() - base


def test_dropped_caches_freed_on_gc(mem_prob):
    """Caches that are never consumed are freed when garbage-collected."""
    K = ktf()
    state = make_state(mem_prob)
    x, ids, w = mem_prob.x, mem_prob.ids, mem_prob.w

    def step():
        y, cache = K.moe_forward(state, x, ids, w)
        del y, cache

    growth = _growth(step)
    assert growth < MEM_SLACK, f"RSS grew {growth / MB:.1f} MiB over {MEM_ITERS} dropped caches"


def test_consumed_caches_release_memory(mem_prob):
    """A consumed cache frees its buffers even while the Python object is still referenced."""
    K = ktf()
    state = make_state(mem_prob)
    x, ids, w = mem_prob.x, mem_prob.ids, mem_prob.w
    gy = make_gy(mem_prob)
    kept = []

    def step():
        y, cache = K.moe_forward(state, x, ids, w)
        g = K.moe_backward(state, cache, gy)
        kept.append(cache)  # consumed, but still alive
        del y, g

    growth = _growth(step)
    assert len(kept) == MEM_ITERS + 3
    assert growth < MEM_SLACK, f"RSS grew {growth / MB:.1f} MiB with {MEM_ITERS} consumed caches kept alive"
    with pytest.raises(ValueError, match=r"\bcache\b"):
        K.moe_backward(state, kept[-1], gy)


def test_live_caches_are_independent(mem_prob):
    """Many caches alive at once really hold their own residuals (no shared stack that wraps)."""
    K = ktf()
    state = make_state(mem_prob)
    n = 6
    p = make_problem(**{**MEM_SHAPE, "T": 33}, seed=44)
    batches = _batches(p, n)
    fwd = [K.moe_forward(state, x, ids, w) for x, ids, w, _ in batches]
    for i in reversed(range(n)):
        x, ids, w, gy = batches[i]
        grads = K.moe_backward(state, fwd[i][1], gy)
        y_ref, g_ref = reference(mem_prob, x=x, ids=ids, w=w, gy=gy)
        assert_matches_reference(fwd[i][0], grads, y_ref, g_ref, where=f"[cache {i} of {n}]")
