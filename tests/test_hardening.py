"""Hardening (issue 10): destruction orders, concurrent backwards, refused threads, LoRA storage
swaps, mixed numpy/torch outputs, single-use caches, error types and dw's bound.

What would crash or hang on a regression runs in a fresh interpreter with a timeout, so that it
fails this test instead of taking the suite down.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import (ROOT, W_MAGNITUDE, assert_matches_reference, check_state, grads_dict, ktf, make_gy, make_lora,
                     make_problem, make_state, make_weights, reference, to_torch)

ERRORS = (TypeError, ValueError)

PRELUDE = """
import faulthandler, gc, sys, threading
import torch
import kt_functional as ktf
faulthandler.enable()
torch.manual_seed(0)

def expert_weights(E=16, H=256, I=128):
    return ktf.ExpertWeights.from_tensors(torch.randn(E, I, H) / 16, torch.randn(E, I, H) / 16,
                                          torch.randn(E, H, I) / 11, threads=2)

def inputs(T=256, H=256, E=16, k=4):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    return torch.randn(T, H).bfloat16(), ids, torch.softmax(torch.randn(T, k), -1)
"""


def run_isolated(body: str, timeout: float = 120) -> str:
    """Runs PRELUDE + body in a fresh interpreter; returns its stdout. A crash (signal), an
    exception or a hang past timeout fails the calling test with the script's output."""
    code = PRELUDE + textwrap.dedent(body)
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung (killed after {timeout} s)\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def prob():
    return make_problem(E=5, H=40, I=24, k=3, T=7, r=4, seed=1010, unused_frac=0.2)


# ----------------------------------------------------------------------------- 1. destruction orders
def test_last_state_of_a_pool_dropped_while_async_forward_runs():
    """repro_9: a helper builds a state, returns moe_forward_async's handle and drops the state (and
    with it the pool's last user) while the job runs: the pool must finish the job, then stop."""
    out = run_isolated("""
        weights = expert_weights()
        x, ids, w = inputs()
        y_ref, _ = ktf.moe_forward(ktf.MoEState(weights, None, threads=2), x, ids, w)

        def launch(threads):
            state = ktf.MoEState(weights, None, threads=threads)  # the only user of this pool
            return ktf.moe_forward_async(state, x, ids, w)

        for i in range(12):
            y, _ = launch(3 + i % 2).result()
            assert torch.equal(y, y_ref), i
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_destruction_orders_while_jobs_run():
    """States, handles, caches, weights and LoRA dropped in every order while jobs run, from the
    main thread, another thread or the garbage collector: no hang, no crash, right results."""
    out = run_isolated("""
        weights = expert_weights()
        x, ids, w = inputs()
        gy = torch.randn(x.shape)
        lora = ktf.LoRA.init(weights, rank=4)
        ref_state = ktf.MoEState(weights, lora, threads=2)
        y_ref, cache = ktf.moe_forward(ref_state, x, ids, w)
        g_ref = ktf.moe_backward(ref_state, cache, gy)

        def fresh(threads=3):
            return ktf.MoEState(weights, ktf.LoRA(**lora.tensors(), alpha=lora.alpha), threads=threads)

        # handle dropped before its result (its finalizer waits), then the state
        state = fresh(); h = ktf.moe_forward_async(state, x, ids, w); del h, state
        # state dropped first, then the handle without result
        state = fresh(); h = ktf.moe_forward_async(state, x, ids, w); del state; del h
        # the cache outlives its state and pool; a backward on another state refuses it
        state = fresh(); h = ktf.moe_forward_async(state, x, ids, w); del state
        y, cache = h.result(); del h
        assert torch.equal(y, y_ref)
        try:
            ktf.moe_backward(fresh(), cache, gy)
            raise AssertionError("a cache of a dropped state was accepted by another state")
        except ValueError:
            pass
        del cache
        # the weights and LoRA objects dropped while the job runs (the job holds what it reads)
        w2 = expert_weights(); st2 = ktf.MoEState(w2, None, threads=3)
        y2_ref, _ = ktf.moe_forward(st2, x, ids, w)
        h = ktf.moe_forward_async(st2, x, ids, w); del st2, w2
        assert torch.equal(h.result()[0], y2_ref)
        # the state dropped by another thread while this one waits on the handle
        state = fresh(); h = ktf.moe_forward_async(state, x, ids, w)
        box = [state]; del state
        t = threading.Thread(target=box.clear); t.start()
        y, cache = h.result(); t.join()
        assert torch.equal(y, y_ref)
        # a reference cycle holding the state and a running handle, collected by the GC
        state = fresh(); h = ktf.moe_forward_async(state, x, ids, w)
        cycle = [state, h]; cycle.append(cycle); del state, h, cycle
        gc.collect()
        # two states sharing one pool: one dropped while the other's job runs
        a, b = fresh(2), fresh(2)
        h = ktf.moe_forward_async(a, x, ids, w); del b
        y, cache = h.result(); del h
        g = ktf.moe_backward(a, cache, gy)
        assert torch.equal(y, y_ref) and torch.equal(g.x, g_ref.x) and torch.equal(g.w, g_ref.w)
        del a
        # the torch adapter: the module dropped between forward and backward
        import kt_functional.torch as ktt
        m = ktt.KTExperts(weights, lora_rank=4, threads=3)
        xg = x.float().requires_grad_(True)
        out = m(xg, ids, w); del m
        out.backward(gy)
        assert xg.grad is not None and torch.isfinite(xg.grad).all()
        print("OK")
    """)
    assert out.strip().endswith("OK")


@pytest.mark.parametrize("holder", ["global", "cycle", "thread"])
def test_interpreter_exit_with_a_job_running(holder):
    """The interpreter exits while a forward runs, its handle held by a global, a reference cycle, or
    a thread that has not finished: it must wait for the job and exit cleanly."""
    hold = {
        "global": "h = ktf.moe_forward_async(state, x, ids, w)",
        "cycle": "h = ktf.moe_forward_async(state, x, ids, w); c = [h]; c.append(c); del h, c",
        "thread": "threading.Thread(target=lambda: ktf.moe_forward(state, x, ids, w)).start()",
    }[holder]
    out = run_isolated(f"""
        state = ktf.MoEState(expert_weights(), None, threads=3)
        x, ids, w = inputs(T=512)
        {hold}
        print("exiting", flush=True)
    """)
    assert "exiting" in out


# ----------------------------------------------------------------------------- 2. concurrent backward
def test_two_threads_backward_one_cache():
    """repro_8: of two threads calling moe_backward on one cache, exactly one gets the gradients
    (equal to a single-threaded backward), the other the documented ValueError."""
    out = run_isolated("""
        weights = expert_weights(E=8, H=128, I=64)
        state = ktf.MoEState(weights, ktf.LoRA.init(weights, rank=4), threads=2)
        x, ids, w = inputs(T=48, H=128, E=8)
        gy = torch.randn(x.shape)
        _, cache = ktf.moe_forward(state, x, ids, w)
        expected = ktf.moe_backward(state, cache, gy)
        outcomes = {}
        for trial in range(60):
            _, cache = ktf.moe_forward(state, x, ids, w)
            barrier = threading.Barrier(2)
            results = []

            def backward():
                barrier.wait()
                try:
                    results.append(ktf.moe_backward(state, cache, gy))
                except ValueError as e:
                    assert "already consumed" in str(e), e
                    results.append("ValueError")

            threads = [threading.Thread(target=backward) for _ in range(2)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            wins = [r for r in results if r != "ValueError"]
            assert len(results) == 2 and len(wins) == 1, results
            assert torch.equal(wins[0].x, expected.x) and torch.equal(wins[0].lora.down_b, expected.lora.down_b)
        print("OK")
    """, timeout=180)
    assert out.strip().endswith("OK")


def test_core_rejects_none_and_short_tuples():
    """repro_8b: the bindings refuse None for every object argument and tuples of the wrong length,
    and an empty handle, with TypeError / ValueError instead of dereferencing them."""
    out = run_isolated("""
        from kt_functional import _core
        weights = expert_weights(E=2, H=16, I=8)
        state = ktf.MoEState(weights, None, threads=2)
        x, ids, w = inputs(T=3, H=16, E=2, k=2)
        _, cache = ktf.moe_forward(state, x, ids, w)
        good = dict(pool=state._pool, weights=weights.packed, isa=state.isa, cache=cache._core)

        def backward(pool, weights, isa, cache, lora=None, grads=(0,) * 6):
            return _core.submit_backward(pool, weights, isa, cache, 0, 0, 0, 0, lora, grads)

        cases = {
            "cache None": lambda: backward(**{**good, "cache": None}),
            "pool None": lambda: backward(**{**good, "pool": None}),
            "weights None": lambda: backward(**{**good, "weights": None}),
            "isa None": lambda: backward(**{**good, "isa": None}),
            "lora_grads None": lambda: backward(**good, grads=None),
            "lora_grads short": lambda: backward(**good, grads=(0,)),
            "lora short": lambda: backward(**good, lora=(0, 0)),
            "forward pool None": lambda: _core.submit_forward(None, weights.packed, state.isa, 0, 0, 0, 3, 2, 0, 0,
                                                              None, False),
            "packed pool None": lambda: _core.PackedExperts(2, 16, 8, (0, 0, (1, 1, 1)), (0, 0, (1, 1, 1)),
                                                            (0, 0, (1, 1, 1)), None),
            "packed spec short": lambda: _core.PackedExperts(2, 16, 8, (0,), (0,), (0,), state._pool),
            "tile shape short": lambda: _core.amx_emulated_tile_dot(0, 0, 0, (16,)),
            "empty job": lambda: _core.Job().wait(),
            "pool of 0 threads": lambda: _core.Pool(0),
        }
        for name, call in cases.items():
            try:
                call()
                raise AssertionError(f"{name}: accepted")
            except (TypeError, ValueError) as e:
                print(name, "->", type(e).__name__)
        assert _core.ForwardCache().consumed and _core.ForwardCache().nbytes == 0
        assert not cache.consumed  # none of the failed calls consumed it
        ktf.moe_backward(state, cache, torch.randn(3, 16))
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_backward_that_cannot_start_leaves_the_cache_usable(prob):
    """A backward the C++ side refuses (here: LoRA rank 0 for a cache made with rank 4, through the
    private bindings) raises before consuming the cache; the public backward then works."""
    from kt_functional import _core  # noqa: PLC0415

    state = make_state(prob)
    y, cache = ktf().moe_forward(state, prob.x, prob.ids, prob.w)
    dx, dw = torch.empty(prob.T, prob.H, dtype=torch.bfloat16), torch.empty(prob.T, prob.k)
    gy = make_gy(prob)
    with pytest.raises(ValueError, match="rank"):
        _core.submit_backward(state._pool, state.weights.packed, state.isa, cache._core, gy.data_ptr(),
                              dx.data_ptr(), 1, dw.data_ptr(), None, (0,) * 6)
    assert not cache.consumed
    grads = ktf().moe_backward(state, cache, gy)
    assert_matches_reference(y, grads, *reference(prob, gy=gy))
    assert cache.consumed


# ----------------------------------------------------------------------------- 3. refused thread
def test_refused_worker_thread_raises_and_stops_the_others():
    """repro_3: the OS refuses a worker thread (address space limited to ~8 thread stacks): the pool
    stops and joins the threads it made and raises RuntimeError naming the count asked; the process
    goes on and, with the limit lifted, computes."""
    out = run_isolated("""
        import os, resource
        weights = expert_weights(E=2, H=16, I=8)
        x, ids, w = inputs(T=3, H=16, E=2, k=2)
        tasks = lambda: len(os.listdir("/proc/self/task"))
        before = tasks()
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
        try:
            ktf.MoEState(weights, None, threads=256)
            raise AssertionError("no error")
        except RuntimeError as e:
            msg = str(e)
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print(msg)
        assert "threads" in msg and "256" in msg, msg
        assert tasks() == before, (before, tasks())  # the threads started were joined
        state = ktf.MoEState(weights, None, threads=8)
        y, _ = ktf.moe_forward(state, x, ids, w)
        assert torch.isfinite(y.float()).all()
        print("OK")
    """)
    assert out.strip().endswith("OK")


# ----------------------------------------------------------------------------- 4. LoRA storage
def test_lora_storage_replaced_is_checked_at_every_call():
    """repro_5: `p.data = ...` after the state is built. A wrong shape, an empty storage or another
    dtype is refused naming the tensor (never read out of bounds); the state works again once a
    right tensor is back, and a right-shaped replacement is used by the next call."""
    out = run_isolated("""
        from kt_functional.reference import moe_reference, rel_err
        E, H, I, T = 4, 64, 32, 8
        weights = ktf.ExpertWeights.from_tensors(torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I))
        lora = ktf.LoRA.init(weights, rank=8)
        state = ktf.MoEState(weights, lora, threads=2)
        x, ids, w = torch.randn(T, H).bfloat16(), torch.randint(0, E, (T, 2)), torch.full((T, 2), 0.5)
        good = lora.down_b.data
        for bad, error in ((torch.zeros(1, 1, 1), ValueError), (torch.empty(0), ValueError),
                           (torch.zeros(E, H, 8, dtype=torch.bfloat16), TypeError),
                           (torch.zeros(E, H, 9), ValueError)):
            lora.down_b.data = bad
            for call in (lambda: ktf.moe_forward(state, x, ids, w),
                         lambda: ktf.moe_forward_async(state, x, ids, w)):
                try:
                    call()
                    raise AssertionError(f"accepted down_b of shape {list(bad.shape)}")
                except error as e:
                    assert "lora.down_b" in str(e), e
        lora.down_b.data = torch.randn(E, H, 8) * 0.1  # right shape, new values: used by the next call
        y, _ = ktf.moe_forward(state, x, ids, w)
        dq = weights.dequantize()
        y_ref = moe_reference(x, ids, w, *dq, lora.tensors(), lora.scale)
        assert rel_err(y, y_ref) <= 1e-2, rel_err(y, y_ref)
        print("OK")
    """)
    assert out.strip().endswith("OK")


def test_lora_storage_swap_between_forward_and_backward(prob):
    """A storage replaced between a forward and its backward is refused like an in-place change,
    without consuming the cache; with the original storage back, the backward is accepted."""
    K = ktf()
    lora = make_lora(prob, **{n: t.clone() for n, t in prob.lora.items()})
    state = make_state(prob, lora=lora)
    gy = make_gy(prob)
    y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
    original = lora.gate_b.data
    lora.gate_b.data = original.clone()  # same values, another storage
    with pytest.raises(ValueError, match=r"state\.lora.*replaced"):
        K.moe_backward(state, cache, gy)
    assert not cache.consumed
    lora.gate_b.data = original
    grads = K.moe_backward(state, cache, gy)
    assert_matches_reference(y, grads, *reference(prob, gy=gy))
    _, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
    with torch.no_grad():
        lora.up_a.add_(1.0)  # in place: the version check
    with pytest.raises(ValueError, match=r"state\.lora"):
        K.moe_backward(state, cache, gy)


# ----------------------------------------------------------------------------- 5. mixed numpy / torch
KINDS = {
    "numpy": lambda t: t.float().numpy(),
    "fp32": lambda t: t.float(),
    "bf16": lambda t: t.bfloat16(),
}


@pytest.mark.parametrize("w_kind", list(KINDS))
@pytest.mark.parametrize("x_kind", list(KINDS))
def test_mixed_numpy_and_torch_outputs(prob, x_kind, w_kind):
    """repro_1: the output kind follows x (README): numpy x gives numpy float32 everywhere; a torch x
    gives y, grads.x in x's dtype and grads.w in w's dtype. gy of either kind."""
    K = ktf()
    state = make_state(prob)
    x, w = KINDS[x_kind](prob.x), KINDS[w_kind](prob.w)
    for gy_kind in ("numpy", "bf16"):
        gy = KINDS[gy_kind](make_gy(prob))
        y, cache = K.moe_forward(state, x, prob.ids, w)
        grads = K.moe_backward(state, cache, gy)
        outputs = {"y": y, "x": grads.x, "w": grads.w, **{n: getattr(grads.lora, n) for n in prob.lora}}
        if x_kind == "numpy":
            for name, out in outputs.items():
                assert isinstance(out, np.ndarray) and out.dtype == np.float32, name
        else:
            for name, out in outputs.items():
                assert isinstance(out, torch.Tensor), name
            assert y.dtype == grads.x.dtype == x.dtype and grads.w.dtype == to_torch(w).dtype
        y_ref, g_ref = reference(prob, x=to_torch(x), w=to_torch(w), gy=to_torch(gy))
        assert_matches_reference(y, grads, y_ref, g_ref, where=f"[x {x_kind}, w {w_kind}, gy {gy_kind}]")


BAD_GY = {
    "wrong shape": lambda p: torch.zeros(p.T, p.H + 1),
    "int": lambda p: torch.zeros(p.T, p.H, dtype=torch.int32),
    "meta": lambda p: torch.zeros(p.T, p.H, device="meta"),
    "sparse": lambda p: torch.zeros(p.T, p.H).to_sparse(),
    "float64 numpy": lambda p: np.zeros((p.T, p.H)),
    "list": lambda p: [[0.0] * p.H] * p.T,
}


def test_bad_gy_does_not_consume_the_cache(prob):
    """Everything that can fail runs before the cache is consumed: after each bad gy the cache still
    gives the right gradients."""
    K = ktf()
    state = make_state(prob)
    x = prob.x.float().numpy()
    y, cache = K.moe_forward(state, x, prob.ids, prob.w.bfloat16())
    for name, make in BAD_GY.items():
        with pytest.raises(ERRORS, match=r"\bgy\b"):
            K.moe_backward(state, cache, make(prob))
        assert not cache.consumed, name
    gy = make_gy(prob)
    grads = K.moe_backward(state, cache, gy)
    assert_matches_reference(y, grads, *reference(prob, x=torch.from_numpy(x), w=prob.w.bfloat16(), gy=gy))


# ----------------------------------------------------------------------------- 6. single use
@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_cache_cannot_be_copied(prob, how):
    """repro_4: a copy would be a second usable handle; copying or pickling a cache raises TypeError
    naming it, and the cache itself is still used exactly once."""
    K = ktf()
    state = make_state(prob)
    y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
    duplicate = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps}[how]
    with pytest.raises(TypeError, match="MoECache"):
        duplicate(cache)
    if how != "copy":  # a container of it, copied deeply
        with pytest.raises(TypeError, match="MoECache"):
            duplicate({"cache": cache})
    gy = make_gy(prob)
    assert_matches_reference(y, K.moe_backward(state, cache, gy), *reference(prob, gy=gy))
    with pytest.raises(ValueError, match="already consumed"):
        K.moe_backward(state, cache, gy)


# ----------------------------------------------------------------------------- 7. error types
def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


BAD_INPUTS = {
    "x on meta": ("x", lambda p, K, s: K.moe_forward(s, _meta(p.x), p.ids, p.w)),
    "ids on meta": ("ids", lambda p, K, s: K.moe_forward(s, p.x, _meta(p.ids), p.w)),
    "w on meta": ("w", lambda p, K, s: K.moe_forward(s, p.x, p.ids, _meta(p.w))),
    "x sparse COO": ("x", lambda p, K, s: K.moe_forward(s, p.x.to_sparse(), p.ids, p.w)),
    "x sparse CSR": ("x", lambda p, K, s: K.moe_forward(s, p.x.float().to_sparse_csr(), p.ids, p.w)),
    "ids sparse": ("ids", lambda p, K, s: K.moe_forward(s, p.x, p.ids.to_sparse(), p.w)),
    "async x on meta": ("x", lambda p, K, s: K.moe_forward_async(s, _meta(p.x), p.ids, p.w)),
    "gate on meta": ("gate", lambda p, K, s: K.ExpertWeights.from_tensors(_meta(p.gate), _meta(p.up), _meta(p.down))),
    "gate sparse": ("gate", lambda p, K, s: K.ExpertWeights.from_tensors(p.gate.to_sparse(), p.up, p.down)),
    "gate_up on meta": ("gate_up", lambda p, K, s: K.ExpertWeights.from_fused(_meta(p.gate_up), p.down)),
    "LoRA gate_a on meta": ("gate_a", lambda p, K, s: make_lora(p, gate_a=_meta(p.lora["gate_a"]))),
    "LoRA down_b sparse": ("down_b", lambda p, K, s: make_lora(p, down_b=p.lora["down_b"].to_sparse())),
    "MoEState threads=2**31": ("threads", lambda p, K, s: K.MoEState(s.weights, None, threads=2**31)),
    "MoEState threads=True": ("threads", lambda p, K, s: K.MoEState(s.weights, None, threads=True)),
    "MoEState threads=2.0": ("threads", lambda p, K, s: K.MoEState(s.weights, None, threads=2.0)),
    "MoEState threads=None": ("threads", lambda p, K, s: K.MoEState(s.weights, None, threads=None)),
    "from_tensors threads=-1": ("threads", lambda p, K, s: K.ExpertWeights.from_tensors(p.gate, p.up, p.down,
                                                                                        threads=-1)),
    "from_tensors threads=0": ("threads", lambda p, K, s: K.ExpertWeights.from_tensors(p.gate, p.up, p.down,
                                                                                       threads=0)),
    "from_tensors threads=2**31": ("threads", lambda p, K, s: K.ExpertWeights.from_tensors(p.gate, p.up, p.down,
                                                                                           threads=2**31)),
    "from_fused threads=-1": ("threads", lambda p, K, s: K.ExpertWeights.from_fused(p.gate_up, p.down, threads=-1)),
    "LoRA alpha=True": ("alpha", lambda p, K, s: K.LoRA(**p.lora, alpha=True)),
    "LoRA alpha overflows fp32": ("alpha", lambda p, K, s: K.LoRA(**p.lora, alpha=1e40)),
    "LoRA alpha=nan": ("alpha", lambda p, K, s: K.LoRA(**p.lora, alpha=float("nan"))),
    "LoRA.init rank=True": ("rank", lambda p, K, s: K.LoRA.init(s.weights, rank=True)),
    "LoRA.init rank=2.0": ("rank", lambda p, K, s: K.LoRA.init(s.weights, rank=2.0)),
    "LoRA.init alpha overflows": ("alpha", lambda p, K, s: K.LoRA.init(s.weights, rank=1, alpha=3.5e38)),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_error_types(prob, case):
    """repro_7: each a TypeError / ValueError naming the argument; the state stays usable."""
    K = ktf()
    state = make_state(prob)
    name, call = BAD_INPUTS[case]
    with pytest.raises(ERRORS, match=rf"\b{name}\b"):
        call(prob, K, state)
    check_state(state, prob, where=f"[after {case}]")


def test_numpy_negative_strides_and_byte_order_are_converted(prob):
    """numpy arrays with negative strides or a non-native byte order give the results of their
    plain copies (x, ids, w, gy and the expert weights)."""
    K = ktf()
    state = make_state(prob)
    x, ids, w = prob.x.float().numpy(), prob.ids.numpy(), prob.w.numpy()
    gy = make_gy(prob, dtype=torch.float32).numpy()
    y0, cache = K.moe_forward(state, x, ids, w)
    g0 = grads_dict(K.moe_backward(state, cache, gy))
    swapped = ">" if sys.byteorder == "little" else "<"
    variants = {
        "negative strides": lambda a: np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1],
        "byte order": lambda a: a.astype(a.dtype.newbyteorder(swapped)),
    }
    for name, convert in variants.items():
        args = [convert(a) for a in (x, ids, w, gy)]
        for a, plain in zip(args, (x, ids, w, gy)):
            assert (any(s < 0 for s in a.strides) or not a.dtype.isnative) and np.array_equal(a, plain), name
        y, cache = K.moe_forward(state, *args[:3])
        grads = grads_dict(K.moe_backward(state, cache, args[3]))
        assert np.array_equal(y, y0), name
        for key, g in grads.items():
            assert torch.equal(g, g0[key]), (name, key)
        gate, up, down = (convert(t.float().numpy()) for t in (prob.gate, prob.up, prob.down))
        dequantized = K.ExpertWeights.from_tensors(gate, up, down).dequantize()
        for got, want in zip(dequantized, state.weights.dequantize()):
            assert torch.equal(got, want), name


def test_torch_adapter_and_hf_validate_threads_rank_alpha(prob):
    """KTExperts, moe_experts and hf.patch_model go through the same validators (naming their own
    argument); patch_model refuses before it changes the model."""
    import kt_functional.torch as ktt  # noqa: PLC0415
    from kt_functional import hf  # noqa: PLC0415

    from hf_models import build  # noqa: PLC0415

    weights = make_weights(prob)
    cases = [
        ("threads", dict(threads=-1)), ("threads", dict(threads=2**31)), ("threads", dict(threads=True)),
        ("lora_rank", dict(lora_rank=True)), ("lora_rank", dict(lora_rank=0)), ("lora_rank", dict(lora_rank=2.5)),
        ("lora_alpha", dict(lora_rank=2, lora_alpha=1e39)), ("lora_alpha", dict(lora_rank=None, lora_alpha=True)),
    ]
    for name, kwargs in cases:
        with pytest.raises(ERRORS, match=rf"\b{name}\b"):
            ktt.KTExperts(weights, **kwargs)
    m = ktt.KTExperts(weights, lora_rank=prob.r, threads=2)
    with pytest.raises(ERRORS, match=r"\balpha\b"):
        ktt.moe_experts(prob.x, prob.ids, prob.w, m._layer, m.lora_tensors(), alpha=True)
    model = build("qwen3_moe")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    for kwargs, name in (({"threads": -1}, "threads"), ({"lora_rank": 1.5}, "lora_rank"),
                         ({"lora_alpha": float("inf")}, "lora_alpha")):
        with pytest.raises(ERRORS, match=rf"\b{name}\b"):
            hf.patch_model(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not list(hf.kt_layers(model)) and all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- 8. dw's bound
def test_dw_bound_single_pair_problems(isa):
    """T = 1, k = 1: dw is one dot product over I, its relative error meaningless near zero (the
    issue: 68 of 400 seeds above 1e-2). MATH.md's bound ||dw - ref|| <= 1e-2 ||m|| holds for every
    seed, with y and dx at the relative tolerance (no LoRA: its gradients at T = 1 have the same
    trouble, see test_property.py)."""
    for seed in range(40):
        prob = make_problem(E=4, H=40, I=24, k=1, T=1, r=4, seed=seed)
        _, _, _, g_ref = check_state(make_state(prob, isa, lora=False), prob, lora=None, where=f"[{isa}/seed {seed}]")
        assert torch.linalg.vector_norm(g_ref[W_MAGNITUDE]) > 0
