"""Concurrent use from Python threads, and the async forward releasing the GIL."""

from __future__ import annotations

import gc
import threading
import time

import torch

from helpers import TOL, assert_matches_reference, ktf, make_gy, make_problem, make_state, reference, rel_err

N_THREADS = 2
N_ITERS = 10


def test_two_threads_same_state(isa):
    """2 Python threads x 10 iterations of forward + backward with different inputs on the
    same state: every result correct."""
    K = ktf()
    prob = make_problem(E=6, H=72, I=40, k=3, T=19, r=3, seed=51)
    state = make_state(prob, isa)
    jobs = {}
    for tid in range(N_THREADS):
        for it in range(N_ITERS):
            p = make_problem(prob.E, prob.H, prob.I, prob.k, 11 + 3 * it + tid, prob.r, seed=100 * tid + it)
            jobs[tid, it] = (p.x, p.ids, p.w, make_gy(p, seed=it))
    expected = {key: reference(prob, x=x, ids=ids, w=w, gy=gy) for key, (x, ids, w, gy) in jobs.items()}
    results, failures = {}, []
    barrier = threading.Barrier(N_THREADS)

    def worker(tid):
        try:
            barrier.wait()
            for it in range(N_ITERS):
                x, ids, w, gy = jobs[tid, it]
                y, cache = K.moe_forward(state, x, ids, w)
                grads = K.moe_backward(state, cache, gy)
                results[tid, it] = (y, grads)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            failures.append((tid, repr(exc)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "worker threads hung"
    assert not failures, failures
    assert len(results) == N_THREADS * N_ITERS
    for key, (y, grads) in results.items():
        y_ref, g_ref = expected[key]
        assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}/thread {key[0]} iter {key[1]}]")


def test_interleaved_forwards_then_backwards_across_threads(isa):
    """Forwards in one thread, the matching backwards in another."""
    K = ktf()
    prob = make_problem(E=5, H=72, I=40, k=2, T=13, r=3, seed=52)
    state = make_state(prob, isa)
    gy = make_gy(prob)
    caches = [K.moe_forward(state, prob.x, prob.ids, prob.w) for _ in range(3)]
    out, failures = [], []

    def backward_all():
        try:
            for _, c in caches:
                out.append(K.moe_backward(state, c, gy))
        except BaseException as exc:  # noqa: BLE001
            failures.append(repr(exc))

    t = threading.Thread(target=backward_all)
    t.start()
    t.join(timeout=60)
    assert not failures, failures
    y_ref, g_ref = reference(prob, gy=gy)
    for (y, _), grads in zip(caches, out, strict=True):
        assert_matches_reference(y, grads, y_ref, g_ref)


# A forward big enough to take a while on every ISA path (several GFLOP).
ASYNC_SHAPE = dict(E=16, H=512, I=256, k=8, T=4096, r=8)


def test_async_forward_releases_gil():
    K = ktf()
    prob = make_problem(**ASYNC_SHAPE, seed=53)
    state = make_state(prob, lora=False)
    K.moe_forward(state, prob.x[:64], prob.ids[:64], prob.w[:64], save_for_backward=False)  # warm up
    t0 = time.perf_counter()
    handle = K.moe_forward_async(state, prob.x, prob.ids, prob.w)
    count = 0
    while not handle.done():
        count += 1
        if time.perf_counter() - t0 > 300:
            break
    elapsed = time.perf_counter() - t0
    assert handle.done(), "async forward did not finish within 300 s"
    assert count > 0, (
        f"no Python progress while moe_forward_async ran ({elapsed * 1e3:.1f} ms): "
        "the forward must run without holding the GIL"
    )
    y, cache = handle.result()
    assert handle.done()
    assert cache is not None
    # check a slice of the output against the reference (the full reference is slow-ish)
    rows = slice(0, 256)
    y_ref, _ = reference(prob, x=prob.x[rows], ids=prob.ids[rows], w=prob.w[rows], lora=None)
    assert rel_err(y[rows], y_ref) <= TOL
    gy = make_gy(prob)
    grads = K.moe_backward(state, cache, gy)
    assert tuple(grads.x.shape) == tuple(prob.x.shape) and torch.isfinite(grads.x).all()


def test_async_forward_small_and_several_in_flight(isa):
    K = ktf()
    prob = make_problem(E=6, H=72, I=40, k=3, T=37, r=3, seed=54)
    state = make_state(prob, isa)
    batches = []
    for i in range(4):
        p = make_problem(prob.E, prob.H, prob.I, prob.k, prob.T, prob.r, seed=200 + i)
        batches.append((p.x, p.ids, p.w, make_gy(p, seed=i)))
    handles = [K.moe_forward_async(state, x, ids, w) for x, ids, w, _ in batches]
    for h, (x, ids, w, gy) in zip(reversed(handles), reversed(batches), strict=True):
        y, cache = h.result()
        assert h.done()
        grads = K.moe_backward(state, cache, gy)
        y_ref, g_ref = reference(prob, x=x, ids=ids, w=w, gy=gy)
        assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}/async]")


def test_sync_forward_lets_other_python_threads_run():
    """moe_forward itself runs without the GIL: a Python counter thread makes progress
    during a (big) synchronous forward."""
    K = ktf()
    prob = make_problem(**ASYNC_SHAPE, seed=55)
    state = make_state(prob, lora=False)
    K.moe_forward(state, prob.x[:64], prob.ids[:64], prob.w[:64], save_for_backward=False)
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        time.sleep(0.05)
        before = counter[0]
        K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
        during = counter[0] - before
    finally:
        stop.set()
        t.join()
    assert during > 0, "a Python thread made no progress during moe_forward: the GIL was held"


def test_dropped_async_handle_keeps_inputs_alive(isa):
    """A handle dropped before result(): its job still reads the inputs it was given, so the
    drop waits for it; the state then gives correct results."""
    K = ktf()
    prob = make_problem(E=6, H=72, I=40, k=3, T=300, r=3, seed=55)
    state = make_state(prob, isa)
    for _ in range(3):
        x = prob.x.clone()  # the handle's only reference to its input
        handle = K.moe_forward_async(state, x, prob.ids, prob.w)
        del x, handle
        gc.collect()
    gy = make_gy(prob)
    y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
    y_ref, g_ref = reference(prob, gy=gy)
    assert_matches_reference(y, K.moe_backward(state, cache, gy), y_ref, g_ref, where=f"[{isa}/dropped handle]")
