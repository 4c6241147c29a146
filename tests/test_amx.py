"""The AMX path: the tile-unit model against the Intel SDM's TDPBF16PS, its faults, the tile
operations the micro-kernel issues (pinned), one packed copy of the weights, and the native path
against the emulated one where the CPU has AMX."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import ROOT, check_state, fwd_bwd, ktf, make_gy, make_problem, make_state

FLT_MIN = np.float32(np.finfo(np.float32).tiny)


def _core():
    return ktf()._core


# ----------------------------------------------------------------------------- the tile-unit model
def _flush(v):
    return np.where(np.abs(v) < FLT_MIN, np.float32(0) * np.sign(v), v).astype(np.float32)


def _bf16_values(bits):
    return _flush((bits.astype(np.uint32) << 16).view(np.float32))


def sdm_tdpbf16ps(C, A, B):
    """TDPBF16PS as the SDM defines it: for each row m and column n, over the K pairs in order,
    fp32 += bf16 x bf16 for element 2k, then 2k+1; round to nearest even (numpy float32 ops);
    denormal inputs and results flushed to zero. C [M, N] fp32, A [M, 2K] bf16 bits, B [K, 2N] bf16 bits."""
    acc = _flush(C.astype(np.float32))
    a, b = _bf16_values(A), _bf16_values(B)
    for k in range(A.shape[1] // 2):
        for e in range(2):
            acc = _flush(acc + _flush(a[:, 2 * k + e][:, None] * b[k, e::2][None, :]))
    return acc


def _emulated_dot(C, A, B, shape=None, configure=True):
    C = np.ascontiguousarray(C, dtype=np.float32).copy()
    A = np.ascontiguousarray(A, dtype=np.uint16)
    B = np.ascontiguousarray(B, dtype=np.uint16)
    if shape is None:
        shape = (C.shape[0], C.shape[1] * 4, A.shape[0], A.shape[1] * 2, B.shape[0], B.shape[1] * 2)
    _core().amx_emulated_tile_dot(C.ctypes.data, A.ctypes.data, B.ctypes.data, tuple(shape), configure)
    return C


def _bits(t):
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("M,N,K", [(16, 16, 16), (3, 5, 7), (1, 1, 1), (16, 1, 16)])
def test_emulator_matches_sdm(M, N, K):
    gen = torch.Generator().manual_seed(M * 100 + N * 10 + K)
    C = torch.randn(M, N, generator=gen).numpy()
    A = _bits(torch.randn(M, 2 * K, generator=gen) * 4)
    B = _bits(torch.randn(K, 2 * N, generator=gen))
    np.testing.assert_array_equal(_emulated_dot(C, A, B), sdm_tdpbf16ps(C, A, B))


def test_emulator_order_rounding_and_denormals():
    one, tiny = 0x3F80, 0x3380  # 1.0 and 2^-24 in bf16
    # 1 + 2^-24 rounds (to even) back to 1, twice: element 2k is added before 2k+1, each rounded.
    C = np.ones((1, 1), np.float32)
    A = np.array([[one, one]], np.uint16)
    B = np.array([[tiny, tiny]], np.uint16)
    assert _emulated_dot(C, A, B)[0, 0] == 1.0  # not 1 + 2^-23 (the pair summed first)
    # A denormal bf16 input, a product that underflows and a denormal accumulator are all zero.
    denormal_bf16, small = 0x0001, 0x0D80  # ~9e-41, 2^-100
    A = np.array([[denormal_bf16, small]], np.uint16)
    B = np.array([[one, small]], np.uint16)
    C = np.full((1, 1), np.float32(1e-40))  # an fp32 denormal
    out = _emulated_dot(C, A, B)
    assert out[0, 0] == 0.0 and not np.signbit(out[0, 0])
    np.testing.assert_array_equal(out, sdm_tdpbf16ps(C, A, B))


@pytest.mark.parametrize(
    "shape,configure,message",
    [
        ((17, 64, 17, 64, 16, 64), True, "rows"),                # 17 rows: more than a tile has
        ((16, 68, 16, 64, 16, 68), True, "bytes per row"),       # 68 bytes: more than 64
        ((16, 64, 16, 64, 8, 64), True, "mismatched"),           # B has 8 rows, A has 16 pairs
        ((16, 32, 16, 64, 16, 64), True, "mismatched"),          # C 8 columns, B 16
        ((8, 64, 16, 64, 16, 64), True, "mismatched"),           # C 8 rows, A 16
        ((16, 64, 16, 64, 16, 64), False, "before the tile configuration"),
    ],
)
def test_emulator_faults(shape, configure, message):
    C = np.zeros((17, 17), np.float32)
    A = np.zeros((17, 34), np.uint16)
    B = np.zeros((17, 34), np.uint16)
    with pytest.raises(RuntimeError, match=message):
        _core().amx_emulated_tile_dot(C.ctypes.data, A.ctypes.data, B.ctypes.data, shape, configure)


# ----------------------------------------------------------------------------- tile operations issued
def _ceil(a, b):
    return -(-a // b)


def expected_tile_ops(routes_per_expert, H, I, r, backward):
    """The micro-kernel's tiling, written independently of the library: per expert, rows padded to
    16 and split into 64-row blocks; each GEMM in 2 x 2 tile blocks (2 row tiles x 2 panels), one
    K step per 32 of K. Base GEMMs run per column chunk of 6 panels (gate_up: 3 gate + 3 up); each adds its LoRA expand on the same chunk (K = the rank slots, C loaded back);
    the LoRA projects run per row block over all their panels (rank slots: gate [0, r), up [R, R+r)).
    fp32 LoRA is carried as bf16 hi + lo parts: a project of width N (rounded to 16) gets N more
    columns, an expand N more K rows; an expert with at most 16 routes runs its projects and expands in
    fp32 off the tiles (read straight from the LoRA matrices), and its backward GEMMs off the tiles too
    (AVX-512 BF16 on the forward panels' transpose)."""
    Hp, Ip, Hpan, Ipan = _ceil(H, 32) * 32, _ceil(I, 32) * 32, _ceil(H, 16), _ceil(I, 16)
    R = _ceil(r, 16) * 16
    n = dict(dot_products=0, loads_a=0, loads_b=0, loads_c=0, zeros=0, stores_c=0, useful=0)

    def gemm(rows, panels, K, accumulate):
        steps = _ceil(K, 32)
        for m in range(0, rows, 32):
            mt = 2 if rows - m >= 32 else 1
            for p in range(0, panels, 2):
                nt = 2 if panels - p >= 2 else 1
                n["dot_products"] += mt * nt * steps
                n["loads_a"] += mt * steps
                n["loads_b"] += nt * steps
                n["loads_c" if accumulate else "zeros"] += mt * nt
                n["stores_c"] += mt * nt

    W_gu, W_d = 2 * _ceil(R + r, 16) * 16, 2 * _ceil(r, 16) * 16  # hi and lo parts
    # (base K, panels, panels per chunk, LoRA expand K, LoRA project (K, N) before it or None)
    # (..., whether it is a backward GEMM)
    gemms = [(Hp, 2 * Ipan, 6, W_gu, (Hp, W_gu), False), (Ip, Hpan, 6, W_d, (Ip, W_d), False)]
    if backward:
        gemms += [(Hp, Ipan, 6, W_d, (Hp, W_d), True), (2 * Ip, Hpan, 6, W_gu, (2 * Ip, W_gu), True)]
    for routes in routes_per_expert:
        if routes == 0:
            continue
        rows = _ceil(routes, 16) * 16
        for K, panels, chunk, expand_k, (project_k, project_n), is_backward in gemms:
            for r0 in range(0, rows, 64):
                block_rows = min(64, rows - r0)
                if routes > 16:
                    gemm(block_rows, _ceil(project_n, 16), project_k, False)
                for p0 in range(0, panels, chunk):
                    if routes > 16 or not is_backward:
                        gemm(block_rows, min(chunk, panels - p0), K, False)
                    if routes > 16:
                        gemm(block_rows, min(chunk, panels - p0), expand_k, True)
        n["useful"] += routes * 3 * H * I * (2 if backward else 1)
    n["useful"] /= 16 * 16 * 32  # multiply-adds of one TDPBF16PS (base GEMMs only)
    return n


def test_tile_operations_pinned():
    """Forward + backward of one awkward shape on amx_emulated issues exactly the tile operations of
    the 2 x 2 tiling (a change of tiling shows here on any machine), at <= 1 tile load per dot product."""
    K = ktf()
    prob = make_problem(E=5, H=80, I=48, k=2, T=37, r=4, seed=3, idle_experts=1)
    state = make_state(prob, "amx_emulated")
    routes = torch.bincount(prob.ids[prob.ids >= 0].flatten(), minlength=prob.E).tolist()
    _core().reset_amx_emulator_counters()
    y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
    fwd = _core().amx_emulator_counters()
    K.moe_backward(state, cache, make_gy(prob))
    both = _core().amx_emulator_counters()
    for counts, backward in ((fwd, False), (both, True)):
        want = expected_tile_ops(routes, prob.H, prob.I, prob.r, backward)
        got = {key: counts[key] for key in ("dot_products", "loads_a", "loads_b", "loads_c", "zeros", "stores_c")}
        assert got == {key: want[key] for key in got}, (backward, got, want)
        # A and B: 1 load per dot product in 2 x 2 blocks, 1.5 where an expert has a single row tile
        assert (counts["loads_a"] + counts["loads_b"]) / counts["dot_products"] <= 1.5
    # The figures themselves (routes per expert 21, 20, 0, 18, 15: rows padded to 32, 32, 32, 16;
    # LoRA r=4 included: its projects and expands are tile GEMMs too, but for the 15-route expert's,
    # run in fp32 off the tiles, as are its backward GEMMs).
    assert routes == [21, 20, 0, 18, 15]
    assert (both["dot_products"], both["loads_a"], both["loads_b"], both["loads_c"]) == (778, 429, 403, 114), both
    assert expected_tile_ops(routes, prob.H, prob.I, prob.r, True)["useful"] == 208.125


def test_tile_configuration_loaded_once_per_worker():
    """The tile configuration is loaded once per worker thread, not per call."""
    script = textwrap.dedent(
        """
        import torch, kt_functional as ktf
        from kt_functional import _core
        from kt_functional.reference import make_problem
        p = make_problem(E=4, H=64, I=32, k=2, T=40, r=2, seed=0)
        st = ktf.MoEState(ktf.ExpertWeights.from_tensors(p.gate, p.up, p.down), None, threads=2, isa="amx_emulated")
        for _ in range(5):
            ktf.moe_forward(st, p.x, p.ids, p.w, save_for_backward=False)
        c = _core.amx_emulator_counters()
        print("RESULT", c["configs"], c["dot_products"])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    configs, dots = map(int, out.stdout.split("RESULT")[1].split())
    assert 1 <= configs <= 2 and dots > 100, (configs, dots)


def test_emulator_counts_without_math():
    """Math off (the bench proxies at full size): the same operations are counted."""
    K = ktf()
    prob = make_problem(E=4, H=64, I=40, k=2, T=20, r=2, seed=9)
    state = make_state(prob, "amx_emulated", lora=False)
    counts = []
    for math in (True, False):
        _core().set_amx_emulator_math(math)
        try:
            _core().reset_amx_emulator_counters()
            K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
            counts.append({k: v for k, v in _core().amx_emulator_counters().items() if k != "configs"})
        finally:
            _core().set_amx_emulator_math(True)
    assert counts[0] == counts[1] and counts[0]["dot_products"] > 0


# ----------------------------------------------------------------------------- one packed copy
def test_one_packed_copy():
    """By default the packed weights are one copy: <= 1.02 x the bf16 bytes plus the K/N padding;
    backward_weights="resident" keeps a second, transposed one."""
    K = ktf()
    E, H, I = 8, 200, 72
    prob = make_problem(E=E, H=H, I=I, k=2, T=4, r=2, seed=1)
    bf16_bytes = 3 * E * H * I * 2
    Hp, Ip, H16, I16 = _ceil(H, 32) * 32, _ceil(I, 32) * 32, _ceil(H, 16) * 16, _ceil(I, 16) * 16
    padded = E * 2 * (Hp * 2 * I16 + Ip * H16)  # gate_up [Hp x 2 I16] and down [Ip x H16] panels
    one = K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down)
    assert one.backward_weights == "on_the_fly"
    assert bf16_bytes <= one.nbytes <= 1.02 * padded, (one.nbytes, bf16_bytes, padded)
    two = K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, backward_weights="resident")
    assert two.nbytes >= 2 * bf16_bytes
    with pytest.raises(ValueError, match="backward_weights"):
        K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, backward_weights="twice")


def test_dequantize_is_the_packed_values():
    K = ktf()
    prob = make_problem(E=3, H=40, I=24, k=2, T=4, r=2, seed=2)
    gate, up, down = K.ExpertWeights.from_fused(prob.gate_up, prob.down).dequantize()
    assert gate.dtype == torch.float32 and gate.shape == (3, 24, 40) and down.shape == (3, 40, 24)
    assert torch.equal(gate, prob.gate.float()) and torch.equal(up, prob.up.float())
    assert torch.equal(down, prob.down.float())


@pytest.mark.parametrize("H,I", [(80, 48), (72, 40), (256, 96)])
def test_on_the_fly_backward_equals_resident(isa, H, I):
    """The backward's transposed operands made per block give bitwise the resident layout's results."""
    prob = make_problem(E=6, H=H, I=I, k=3, T=45, r=5, seed=H + I, idle_experts=1, unused_frac=0.1)
    gy = make_gy(prob)
    outs = []
    for backward_weights in ("on_the_fly", "resident"):
        w = ktf().ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, backward_weights=backward_weights)
        state = make_state(prob, isa, weights=w)
        outs.append(fwd_bwd(state, prob.x, prob.ids, prob.w, gy))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0, y1) and torch.equal(g0.x, g1.x) and torch.equal(g0.w, g1.w)
    for name in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"):
        assert torch.equal(getattr(g0.lora, name), getattr(g1.lora, name)), name
    check_state(make_state(prob, isa, weights=w), prob, gy=gy, where=f"[{isa} resident]")


# ----------------------------------------------------------------------------- native AMX
@pytest.mark.skipif("amx" not in ktf().available_isas(), reason="this CPU (or Linux) offers no AMX tiles")
def test_native_amx_matches_emulated():
    """On a CPU with AMX: the hardware path equals the tile-unit model within 1e-5."""
    from helpers import rel_err

    prob = make_problem(E=8, H=272, I=112, k=3, T=70, r=6, seed=4, unused_frac=0.1)
    gy = make_gy(prob)
    (y0, g0), (y1, g1) = (fwd_bwd(make_state(prob, isa), prob.x, prob.ids, prob.w, gy) for isa in ("amx", "amx_emulated"))
    assert rel_err(y0, y1) <= 1e-5 and rel_err(g0.x, g1.x) <= 1e-5
    for name in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"):
        assert rel_err(getattr(g0.lora, name), getattr(g1.lora, name)) <= 1e-5, name
