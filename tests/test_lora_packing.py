"""The kernels of experts with few rows and of the per-call LoRA, on each ISA path (the AVX-512 ones on the avx512
and amx paths, the portable loops elsewhere): the LoRA packer (pack.hpp's pack_panels with lo parts) against an
independent numpy model of the VNNI panel layout and of the hi / lo split, bitwise, at awkward shapes and values
(denormals, NaN, infinities); the fp32 LoRA project and expand (kernels.hpp's project_f32, expand_f32) and the
backward GEMM on the forward panels' transpose (gemm_t) against float64."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import ktf

PANEL = 16


def bf16_bits(v: np.ndarray) -> np.ndarray:
    """VCVTNE2PS2BF16: nearest even, denormal inputs as signed zeros, NaN quieted."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = np.where((u & 0x7F800000) == 0, (u >> 16) & 0x8000, rounded)
    out = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, out)
    return out.astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def model_pack(B: np.ndarray, Kp: int, k_offset: int, step: int, lo_delta: int, size: int) -> np.ndarray:
    """B [K, N] into panels of 16 columns x Kp/2 pair-rows x 2: element (k, n) at panel n // 16 (placed at
    (n // 16) * step panels), pair-row (k + k_offset) // 2, column n % 16, half (k + k_offset) % 2; its lo
    part bf16(v - bf16(v)) lo_delta elements further."""
    K, N = B.shape
    out = np.zeros(size, dtype=np.uint16)
    hi = bf16_bits(B)
    with np.errstate(invalid="ignore"):
        lo = bf16_bits(B - bf16_values(hi))
    k = np.arange(K)[:, None] + k_offset
    n = np.arange(N)[None, :]
    index = (n // PANEL) * step * Kp * PANEL + (k >> 1) * 2 * PANEL + (n % PANEL) * 2 + (k & 1)
    out[index] = hi
    out[index + lo_delta] = lo
    return out


def awkward_values(rng, shape):
    v = rng.standard_normal(shape).astype(np.float32)
    pick = rng.random(shape)
    v[pick < 0.03] *= np.float32(1e-40)  # fp32 denormals: their hi and lo parts flush to zero
    v[(pick >= 0.03) & (pick < 0.04)] = np.nan
    v[(pick >= 0.04) & (pick < 0.05)] = -np.inf
    v[(pick >= 0.05) & (pick < 0.06)] = np.float32(3.3e38)  # rounds up to infinity
    return v


@pytest.mark.parametrize("transpose", [True, False], ids=["k_contiguous", "n_contiguous"])
@pytest.mark.parametrize("K, N, k_offset, step", [(16, 16, 0, 1), (2048, 16, 0, 1), (16, 768, 16, 2),
                                                   (38, 29, 2, 1), (6, 45, 10, 2), (100, 3, 0, 1)])
def test_lora_packer_matches_layout_model(isa, transpose, K, N, k_offset, step):
    rng = np.random.default_rng(K * 1000 + N + k_offset)
    B = awkward_values(rng, (K, N))
    # The source as the LoRA matrices lie: k contiguous (t[n][k], the forward's A and B) or n contiguous.
    src = np.ascontiguousarray(B.T) if transpose else np.ascontiguousarray(B)
    sk, sn = (1, K) if transpose else (N, 1)
    Kp = -(-(K + k_offset) // 32) * 32
    panels = -(-N // PANEL)
    lo_delta = panels * step * Kp * PANEL  # past every hi part, as LoraPanels places them
    size = 2 * lo_delta + 64
    want = model_pack(B, Kp, k_offset, step, lo_delta, size)
    got = np.zeros(size, dtype=np.uint16)
    ktf()._core.pack_panels_f32(isa, src.ctypes.data, sk, sn, K, N, Kp, k_offset, step, got.ctypes.data, lo_delta)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"[{isa}] {bad.size} elements differ, first at {bad[:5]}: got {got[bad[:5]]}, want {want[bad[:5]]}"


@pytest.mark.parametrize("matrices", [1, 2], ids=["one", "two_in_lock_step"])
@pytest.mark.parametrize("transpose", [True, False], ids=["k_contiguous", "n_contiguous"])
@pytest.mark.parametrize("rows, K, N", [(1, 2048, 16), (2, 768, 16), (3, 33, 5), (4, 16, 1), (5, 100, 17),
                                        (7, 1, 3), (16, 47, 16)])
def test_lora_project_f32_matches_float64(isa, transpose, rows, K, N, matrices):
    """C = A x S in fp32 from bf16 A rows (lda past K), S read as the LoRA matrices lie (k contiguous: an A
    [rank][in], the forward's projects, a sequential stream with its prefetches running past the end; n
    contiguous: a B [out][rank], the backward's); only C's first N columns written. Two matrices (the
    forward's Ag and Au) are read in lock-step, each into its own C."""
    rng = np.random.default_rng(rows * 10000 + K * 100 + N + transpose + 7 * matrices)
    sk, sn = (1, K) if transpose else (N, 1)
    lda, ldc = K + 7, N + 5
    A = bf16_bits(rng.standard_normal((rows, lda)).astype(np.float32))
    a = bf16_values(A)[:, :K].astype(np.float64)
    Ss = [rng.standard_normal((K, N)).astype(np.float32) for _ in range(matrices)]
    srcs = [np.ascontiguousarray(S.T) if transpose else np.ascontiguousarray(S) for S in Ss]
    Cs = [rng.standard_normal((rows, ldc)).astype(np.float32) for _ in range(matrices)]
    wants = []
    for S, C in zip(Ss, Cs):
        want = C.astype(np.float64)
        want[:, :N] = a @ S.astype(np.float64)
        wants.append(want)
    second = {"S2": srcs[1].ctypes.data, "C2": Cs[1].ctypes.data} if matrices == 2 else {}
    ktf()._core.project_f32(isa, A.ctypes.data, lda, rows, srcs[0].ctypes.data, sk, sn, K, N, Cs[0].ctypes.data, ldc,
                            **second)
    for i, (S, C, want) in enumerate(zip(Ss, Cs, wants)):
        bound = 4 * (K + 1) * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(S).astype(np.float64))
        assert np.all(C[:, N:] == want[:, N:]), f"[{isa}] matrix {i}: columns past N were written"
        err = np.abs(C[:, :N] - want[:, :N])
        assert np.all(err <= bound), f"[{isa}] matrix {i}: max error {err.max():.3g} over the fp32 bound"


@pytest.mark.parametrize("transpose", [True, False], ids=["k_contiguous", "n_contiguous"])
@pytest.mark.parametrize("rows, K, N", [(1, 16, 16), (2, 16, 768), (3, 3, 29), (16, 20, 45), (5, 40, 1), (1, 1, 33)])
def test_lora_expand_f32_matches_float64(isa, transpose, rows, K, N):
    """C += coef x S in fp32 for every (row, column), S read as the LoRA matrices lie (k contiguous: a B
    [out][rank]; n contiguous: an A [rank][in]); columns past N untouched."""
    rng = np.random.default_rng(rows * 10000 + K * 100 + N)
    S = rng.standard_normal((K, N)).astype(np.float32)
    src = np.ascontiguousarray(S.T) if transpose else np.ascontiguousarray(S)
    sk, sn = (1, K) if transpose else (N, 1)
    ldcoef, ldc = K + 3, N + 5
    coef = rng.standard_normal((rows, ldcoef)).astype(np.float32)
    C = rng.standard_normal((rows, ldc)).astype(np.float32)
    want = C.astype(np.float64)
    want[:, :N] += coef[:, :K].astype(np.float64) @ S.astype(np.float64)
    ktf()._core.expand_f32(isa, coef.ctypes.data, ldcoef, rows, src.ctypes.data, sk, sn, K, N, C.ctypes.data, ldc)
    bound = 4 * (K + 1) * np.finfo(np.float32).eps * (np.abs(C[:, :N]).astype(np.float64) +
                                                      np.abs(coef[:, :K]) @ np.abs(S).astype(np.float64))
    assert np.all(C[:, N:] == want[:, N:]), f"[{isa}] columns past N were written"
    err = np.abs(C[:, :N] - want[:, :N])
    assert np.all(err <= bound), f"[{isa}] max error {err.max():.3g} over the fp32 bound"


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("rows, np_, nq", [(1, 1, 8), (2, 3, 16), (3, 128, 48), (4, 5, 8), (7, 9, 24), (16, 2, 8)])
def test_gemm_t_matches_float64(isa, accumulate, rows, np_, nq):
    """C[m][2q + t] (+)= sum_p sum_j A[m][16p + j] B[p][q][j][t] for pair-rows q < nq of np panels (panel stride
    past the pair-rows read), bf16 inputs, only C's first 2 nq columns written."""
    rng = np.random.default_rng(rows * 1000 + np_ * 10 + nq)
    lda, stride, ldc = 16 * np_ + 8, (nq + 3) * 2 * PANEL, 2 * nq + 5
    A = bf16_bits(rng.standard_normal((rows, lda)).astype(np.float32))
    B = bf16_bits(rng.standard_normal(np_ * stride).astype(np.float32))
    C = rng.standard_normal((rows, ldc)).astype(np.float32)
    a = bf16_values(A)[:, : 16 * np_].astype(np.float64).reshape(rows, np_, PANEL)
    b = bf16_values(B).astype(np.float64).reshape(np_, stride)[:, : nq * 2 * PANEL].reshape(np_, nq, PANEL, 2)
    want = C.astype(np.float64)
    prod = np.einsum("mpj,pqjt->mqt", a, b).reshape(rows, 2 * nq)
    want[:, : 2 * nq] = (want[:, : 2 * nq] if accumulate else 0) + prod
    magnitude = np.einsum("mpj,pqjt->mqt", np.abs(a), np.abs(b)).reshape(rows, 2 * nq)
    bound = 4 * (16 * np_ + 1) * np.finfo(np.float32).eps * ((np.abs(C[:, : 2 * nq]) if accumulate else 0) + magnitude)
    ktf()._core.gemm_t(isa, A.ctypes.data, lda, rows, B.ctypes.data, stride, np_, nq, C.ctypes.data, ldc, accumulate)
    assert np.all(C[:, 2 * nq:] == want[:, 2 * nq:]), f"[{isa}] columns past 2 nq were written"
    err = np.abs(C[:, : 2 * nq] - want[:, : 2 * nq])
    assert np.all(err <= bound), f"[{isa}] max error {err.max():.3g} over the fp32 bound"
