"""Memory: weights packed once (sources can be freed), and many forward/backward cycles
leave RSS flat."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref

import torch

from helpers import check_state, ktf, make_gy, make_lora, make_problem, make_state, rss_bytes, settle

MB = 1 << 20


def test_packing_copies_once_and_frees_sources():
    """After from_tensors the source tensors can be deleted (the state holds its own packed
    copy, no reference to them), and results stay correct."""
    K = ktf()
    prob = make_problem(E=8, H=72, I=40, k=2, T=21, r=3, seed=61)
    gate, up, down = prob.gate.clone(), prob.up.clone(), prob.down.clone()
    refs = [weakref.ref(t) for t in (gate, up, down)]
    weights = K.ExpertWeights.from_tensors(gate, up, down)
    del gate, up, down
    settle()
    assert all(r() is None for r in refs), "ExpertWeights must not keep the source tensors alive"
    E, H, I = prob.E, prob.H, prob.I
    assert (weights.num_experts, weights.hidden_size, weights.intermediate_size) == (E, H, I)
    assert weights.nbytes >= 3 * E * I * H * 2, "packed copy smaller than the bf16 experts"
    state = K.MoEState(weights, make_lora(prob), threads=2)
    check_state(state, prob)


def test_from_fused_frees_sources():
    K = ktf()
    prob = make_problem(E=4, H=64, I=48, k=2, T=9, r=2, seed=62)
    gate_up, down = prob.gate_up.clone(), prob.down.clone()
    refs = [weakref.ref(gate_up), weakref.ref(down)]
    weights = K.ExpertWeights.from_fused(gate_up, down)
    del gate_up, down
    settle()
    assert all(r() is None for r in refs), "ExpertWeights must not keep the source tensors alive"
    assert weights.intermediate_size == prob.I and weights.nbytes >= 3 * prob.E * prob.I * prob.H * 2
    check_state(K.MoEState(weights, make_lora(prob), threads=2), prob)


def test_weights_independent_of_later_source_changes():
    """Packing copies: changing the source tensors afterwards does not change results."""
    K = ktf()
    prob = make_problem(E=4, H=64, I=48, k=2, T=9, r=2, seed=63)
    gate, up, down = prob.gate.clone(), prob.up.clone(), prob.down.clone()
    weights = K.ExpertWeights.from_tensors(gate, up, down)
    gate.zero_()
    up.mul_(3)
    down.fill_(1.0)
    check_state(K.MoEState(weights, make_lora(prob), threads=2), prob)


def test_weights_freed_with_state():
    """Dropping the state and the weights returns the packed memory."""
    K = ktf()
    prob = make_problem(E=32, H=512, I=256, k=2, T=4, r=2, seed=64)  # 24 MiB of bf16 experts
    nbytes = 3 * prob.E * prob.I * prob.H * 2

    def build_and_drop():
        w = K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down)
        s = K.MoEState(w, None, threads=1)
        K.moe_forward(s, prob.x, prob.ids, prob.w, save_for_backward=False)
        del s, w

    build_and_drop()
    settle()
    base = rss_bytes()
    for _ in range(5):
        build_and_drop()
    settle()
    growth = rss_bytes() - base
    assert growth < 2 * nbytes, f"RSS grew {growth / MB:.1f} MiB after 5 build/drop of {nbytes / MB:.0f} MiB weights"


def test_rss_flat_over_many_cycles():
    """A few hundred forward/backward cycles leave RSS flat (< 20 MiB growth after warmup).
    The shape is small but a leaked cache per cycle (>= 64 KiB even for x alone) would show."""
    K = ktf()
    prob = make_problem(E=8, H=128, I=64, k=4, T=256, r=4, seed=65)
    lora = make_lora(prob)
    state = K.MoEState(K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down), lora, threads=2)
    gy = make_gy(prob)

    def cycle():
        y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
        g = K.moe_backward(state, cache, gy)
        return y, g

    for _ in range(30):
        cycle()
    settle()
    base = rss_bytes()
    for _ in range(400):
        y, g = cycle()
    settle()
    growth = rss_bytes() - base
    assert growth < 20 * MB, f"RSS grew {growth / MB:.1f} MiB over 400 forward/backward cycles"
    assert torch.isfinite(y).all() and torch.isfinite(g.x).all()


def test_workspace_cache_reused_bounded_and_released():
    """Per-call workspaces are kept for the next call (no fresh pages), within KT_WORKSPACE_CACHE_MB,
    and release_workspaces() gives them back to the OS."""
    K = ktf()
    prob = make_problem(E=8, H=512, I=128, k=4, T=1024, r=4, seed=5)
    state = make_state(prob, lora=False)
    settle()
    for _ in range(2):  # warm-up: the workspaces, and torch's / malloc's own first-call memory
        K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    after_one = rss_bytes()
    for _ in range(5):  # the same shape again: served from the cache, RSS does not grow
        K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    assert rss_bytes() - after_one < 4 * MB
    released = K.release_workspaces()
    assert released >= 4 * 1024 * 512 * 2  # at least the gathered x rows (routes x H bf16)
    assert rss_bytes() <= after_one - released + 4 * MB
    assert K.release_workspaces() == 0
    script = ("import kt_functional as K, torch\n"
              "from kt_functional.reference import make_problem\n"
              "p = make_problem(E=8, H=512, I=128, k=4, T=1024, r=4, seed=5)\n"
              "s = K.MoEState(K.ExpertWeights.from_tensors(p.gate, p.up, p.down), None, threads=2)\n"
              "K.moe_forward(s, p.x, p.ids, p.w)\n"
              "print('RELEASED', K.release_workspaces())\n")
    env = dict(os.environ, KT_WORKSPACE_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RELEASED 0" in out.stdout  # a limit of 0 keeps nothing


def test_lora_gradients_recycle_workspace_memory():
    """The LoRA gradients a backward returns live in the kernels' workspace memory: while the caller holds
    them a later call never writes into them; once freed, the next backward's gradients reuse that memory
    (no fresh pages to fault in), and release_workspaces() can give it back."""
    import resource

    K = ktf()
    prob = make_problem(E=32, H=1024, I=96, k=2, T=8, r=16, seed=64)  # Ag, Au, Bd: 2 MiB each
    state = make_state(prob, lora=True)
    gys = [make_gy(prob, seed) for seed in (1, 2)]

    def backward(gy):
        _, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
        return K.moe_backward(state, cache, gy)

    held = backward(gys[0]).lora
    kept = {name: getattr(held, name).clone() for name in ("gate_a", "up_a", "down_b")}
    other = backward(gys[1]).lora  # while the first call's gradients are held
    for name, want in kept.items():
        assert torch.equal(getattr(held, name), want), f"{name}: a later backward wrote into held gradients"
        assert not torch.equal(getattr(other, name), want), f"{name}: gy changed, the gradient did not"
    assert all(getattr(held, n).data_ptr() != getattr(other, n).data_ptr() for n in kept)
    del held, other, kept
    settle()
    backward(gys[0])  # warm: its gradients are freed at once, into the cache
    big = sum(2 * MB // 4096 for _ in range(3))  # pages of Ag, Au, Bd
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grads = backward(gys[1]).lora
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert faults < big // 4, f"{faults} page faults in a backward whose {big} pages of gradients were cached"
    assert torch.isfinite(grads.gate_a).all()
    del grads  # (settle() would release the cache itself)
    assert K.release_workspaces() >= 3 * 2 * MB
    unused = K._core.workspace_f32((1024, 1024))  # a capsule nobody consumed still gives its memory back
    del unused
    assert K.release_workspaces() >= 4 * MB
