"""Quantized base weights (MATH.md, "Quantized base weights"): int8, fp8_block, int4_group, mxfp4.

- dequantize() is bf16(code * scale) of an independent reference dequantizer (kt_functional.reference),
  at shapes with partial 128-blocks and 32-groups;
- forward and backward on every ISA path match the fp32 reference run on dequantize()'d weights
  (MATH.md tolerances); where the operands are decoded (experts with more than 16 rows, or ISAs
  without a kernel that multiplies straight from the codes) they are bitwise equal to a bf16 state
  packed from those same values (so the decoders hand the micro-kernels exactly what dequantize()
  reports); experts with few rows on AVX-512 / AMX (CODES_ROWS) multiply by the unrounded code * scale;
- checkpoint layouts as their own libraries write them: compressed-tensors' pack-quantized; the
  FP8 and MXFP4 dequantization of transformers as a cross-check;
- nbytes, errors, pickling, the torch adapter.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from helpers import (
    LORA_KEYS,
    TOL,
    assert_matches_reference,
    fwd_bwd,
    grads_dict,
    ktf,
    make_gy,
    make_lora,
    make_problem,
    ref,
    reference,
    rel_err,
)

QUANTIZED = ("int8", "fp8_block", "int4_group", "mxfp4")

# H, I not multiples of 128 or 32 (partial fp8 blocks and 4-bit groups); T = 1; idle experts; -1 slots.
# An expert with at most 16 rows multiplies from its codes (CODES_ROWS) or decodes its operand a K chunk
# at a time ("awkward", "T1_idle"), one with more decodes it whole for all its rows ("wide": ~50 rows,
# "many_rows": ~100, two row blocks).
CASES = {
    "awkward": dict(E=5, H=200, I=72, k=3, T=23, r=3, unused_frac=0.2, all_unused_tokens=(4,)),
    "T1_idle": dict(E=6, H=136, I=40, k=2, T=1, r=4),
    "wide": dict(E=4, H=264, I=160, k=2, T=70, r=8, idle_experts=1),
    "many_rows": dict(E=3, H=328, I=200, k=2, T=150, r=4),
}


def quantized_weights(prob, storage):
    return ktf().ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, storage=storage)


def checkpoint(storage, prob):
    """The problem's projections in `storage`'s checkpoint layout (kt_functional.quant's quantizers)."""
    from kt_functional import quant

    return tuple(quant.quantize(storage, t) for t in (prob.gate, prob.up, prob.down))


@pytest.mark.parametrize("storage", QUANTIZED)
def test_dequantize_matches_reference_decoder(storage):
    prob = make_problem(**CASES["awkward"], seed=7)
    gate, up, down = checkpoint(storage, prob)
    w = ktf().ExpertWeights.from_quantized(storage, gate, up, down)
    assert w.storage == storage
    H, I = prob.H, prob.I
    for name, mine, tensors, inp in (("gate", w.dequantize()[0], gate, H), ("up", w.dequantize()[1], up, H),
                                     ("down", w.dequantize()[2], down, I)):
        expected = ref.dequantize_checkpoint(storage, tensors, inp).bfloat16().float()
        assert mine.dtype == torch.float32 and mine.shape == expected.shape, name
        assert torch.equal(mine, expected), f"{storage} {name}: max diff {(mine - expected).abs().max()}"


def check_dequantized_reference(weights, prob, isa, where):
    """Forward + backward of `weights` (with the problem's LoRA) vs the fp32 reference run on its
    dequantize()'d values; returns (y, grads, gy, (gate, up, down))."""
    gate, up, down = weights.dequantize()
    gy = make_gy(prob)
    state = ktf().MoEState(weights, make_lora(prob), threads=2, isa=isa)
    y, grads = fwd_bwd(state, prob.x, prob.ids, prob.w, gy)
    y_ref, g_ref = reference(prob, gy=gy, gate=gate, up=up, down=down)
    assert_matches_reference(y, grads, y_ref, g_ref, where=where)
    return y, grads, gy, (gate, up, down)


# ISA paths whose experts with at most CODES_ROWS[storage] rows in a forward multiply straight from the
# codes (kernels.hpp, gemm_codes): a group's products of exact code values summed in fp32, then scaled.
FROM_CODES = ("avx512", "amx")
CODES_ROWS = {"int8": 4, "fp8_block": 4, "int4_group": 16, "mxfp4": 16}


def expert_rows(prob):
    """Rows (routes) of every expert that gets any."""
    ids = prob.ids[prob.ids >= 0]
    return [int(n) for n in torch.bincount(ids, minlength=prob.E) if n > 0]


@pytest.mark.parametrize("storage", QUANTIZED)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(isa, storage, case):
    prob = make_problem(**CASES[case], seed=11 + list(CASES).index(case))
    weights = quantized_weights(prob, storage)
    y, grads, gy, (gate, up, down) = check_dequantized_reference(weights, prob, isa, f"[{isa}/{storage}/{case}]")
    # The decoded operands are exactly the bf16 values dequantize() reports: a bf16 state packed from
    # them gives bitwise the same outputs (forward GEMMs and both transposed backward GEMMs). Experts
    # with few rows on ISAs with gemm_codes multiply by the unrounded values instead (see
    # test_forward_gemm_multiplies_by_code_times_scale).
    if isa in FROM_CODES and min(expert_rows(prob)) <= CODES_ROWS[storage]:
        return
    twin = ktf().MoEState(ktf().ExpertWeights.from_tensors(gate, up, down), make_lora(prob), threads=2, isa=isa)
    y2, grads2 = fwd_bwd(twin, prob.x, prob.ids, prob.w, gy)
    assert torch.equal(y, y2), f"[{isa}/{storage}/{case}] y differs from the bf16 twin"
    for name, t in grads_dict(grads).items():
        assert torch.equal(t, grads_dict(grads2)[name]), f"[{isa}/{storage}/{case}] grads.{name} differs"


def split_backwards(weights, prob, isa, lora, h, dgu, gy):
    """(Grads of moe_down_backward, of moe_gate_up_backward) through the split path, whose backwards take the
    layer's inputs of the forward as given (h, dg | du): the forward's own products do not enter them."""
    from kt_functional import ops

    state = ktf().MoEState(weights, lora, threads=2, isa=isa)
    _, up_cache = ops.moe_gate_up_forward(state, prob.x, prob.ids, prob.w)
    _, down_cache = ops.moe_down_forward(state, h, prob.ids, prob.w)
    return ops.moe_down_backward(state, down_cache, gy), ops.moe_gate_up_backward(state, up_cache, dgu)


def split_inputs(prob, seed=5, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(prob.T, prob.k, prob.I, generator=g) * 0.5).to(dtype)
    return h, torch.randn(prob.T, prob.k, 2 * prob.I, generator=g) * 0.1


@pytest.mark.parametrize("storage", QUANTIZED)
def test_few_row_backward_matches_bf16_twin_bitwise(isa, storage):
    """The backward GEMMs of experts with few rows (the forward panels' transpose, decoded in registers where
    the ISA has gemm_codes_t) multiply by exactly dequantize()'s values, but for the experts whose forward
    multiplies from the codes (test_backward_gemm_multiplies_by_code_times_scale): a bf16 state packed from
    those values gives bitwise the same dh, dw, dx and LoRA gradients. Every expert gets 10 routes here:
    above the 8-bit formats' CODES_ROWS, so only the 4-bit formats on FROM_CODES have nothing to compare."""
    if isa in FROM_CODES and CODES_ROWS[storage] >= 10:
        pytest.skip("every expert with at most 16 rows multiplies by code * scale here")
    prob = make_problem(E=4, H=200, I=72, k=2, T=20, r=3, seed=4)  # partial groups and blocks
    prob.ids = torch.stack([torch.arange(prob.T) % prob.E, (torch.arange(prob.T) + 1) % prob.E], dim=1)
    assert expert_rows(prob) == [10] * prob.E
    weights = quantized_weights(prob, storage)
    gate, up, down = (t.bfloat16() for t in weights.dequantize())
    h, dgu = split_inputs(prob)
    gy = make_gy(prob)
    outs = [split_backwards(w, prob, isa, make_lora(prob), h, dgu, gy)
            for w in (weights, ktf().ExpertWeights.from_tensors(gate, up, down))]
    for part, got, want in zip(("down", "gate_up"), outs[0], outs[1]):
        pairs = [("x", got.x, want.x), ("w", got.w, want.w)] + [
            (name, getattr(got.lora, name), getattr(want.lora, name)) for name in LORA_KEYS]
        for name, a, b in pairs:
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.equal(a, b), f"[{isa}/{storage}] {part}: {name} differs from the twin"


@pytest.mark.parametrize("storage", QUANTIZED)
def test_no_lora_forward_without_cache(isa, storage):
    prob = make_problem(E=3, H=96, I=40, k=2, T=9, r=2, seed=3)
    weights = quantized_weights(prob, storage)
    y, cache = ktf().moe_forward(ktf().MoEState(weights, None, isa=isa), prob.x, prob.ids, prob.w,
                                 save_for_backward=False)
    gate, up, down = weights.dequantize()
    y_ref, _ = reference(prob, lora=None, gate=gate, up=up, down=down)
    assert cache is None and rel_err(y, y_ref) <= TOL


# Quantization error of from_tensors(storage=) vs the bf16 weights (Gaussian weights, relative Frobenius
# norm): what each format costs; the bounds are these formats' usual errors with some margin.
EXPECTED_ERROR = {"int8": 0.01, "fp8_block": 0.04, "int4_group": 0.12, "mxfp4": 0.15}


@pytest.mark.parametrize("storage", QUANTIZED)
def test_from_tensors_error_vs_bf16(storage):
    prob = make_problem(E=4, H=256, I=128, k=2, T=4, r=2, seed=5)
    deq = quantized_weights(prob, storage).dequantize()
    errs = [rel_err(d, w.float()) for d, w in zip(deq, (prob.gate, prob.up, prob.down))]
    print(f"{storage}: relative error vs bf16 weights gate/up/down = {[round(e, 4) for e in errs]}")
    assert max(errs) <= EXPECTED_ERROR[storage] and min(errs) > 0


def format_bytes(storage, E, out, inp):
    """Bytes of one projection in `storage` at its padded size (out to 16, in to 32) : values + scales."""
    out, inp = math.ceil(out / 16) * 16, math.ceil(inp / 32) * 32
    values = E * out * inp * (0.5 if storage in ("int4_group", "mxfp4") else 1)
    scales = {"int8": E * out * 4, "fp8_block": E * math.ceil(out / 128) * math.ceil(inp / 128) * 4,
              "int4_group": E * out * inp / 32 * 2, "mxfp4": E * out * inp / 32}[storage]
    return values + scales


@pytest.mark.parametrize("storage", QUANTIZED)
def test_nbytes_is_the_formats_bytes(storage):
    E, H, I = 4, 1024, 384
    prob = make_problem(E=E, H=H, I=I, k=1, T=1, r=1, seed=1)
    w = quantized_weights(prob, storage)
    expected = 2 * format_bytes(storage, E, I, H) + format_bytes(storage, E, H, I)
    assert abs(w.nbytes - expected) <= 0.03 * expected, (w.nbytes, expected)
    bf16 = ktf().ExpertWeights.from_tensors(prob.gate, prob.up, prob.down).nbytes
    assert w.nbytes < (0.53 if storage in ("int8", "fp8_block") else 0.3) * bf16


def test_pickle_and_copy_keep_the_packed_codes():
    import copy

    prob = make_problem(E=3, H=100, I=40, k=2, T=5, r=2, seed=2)
    for storage in QUANTIZED:
        w = quantized_weights(prob, storage)
        back = pickle.loads(pickle.dumps(w))
        assert back.storage == storage and back.nbytes == w.nbytes
        for a, b in zip(w.dequantize(), back.dequantize()):
            assert torch.equal(a, b)
        assert copy.deepcopy(w) is w


def packed_4bit_panels(codes, scale_bytes, K):
    """Model of the packed 4-bit panels (kernels.hpp, QuantPanels; packed layout 3) of one expert's
    projection: codes uint8 [out, in] (a code's 4 bits), scale_bytes uint8 [out, in / 32, bytes per scale]
    -> uint8 [panels, panel bytes]. Groups of 32 rows; chunks of 64 / (16 * bytes per scale) groups, each
    its 64 bytes of scales (16 columns) and then its codes, 4 pair-rows per 64-byte block, element i of
    pair-row q in bits 4 (q % 4) of little-endian 16-bit word i."""
    out, n_in = codes.shape
    sb = scale_bytes.shape[2]
    per_chunk = 64 // (16 * sb)
    Kp = -(-K // 32) * 32
    groups = Kp // 32
    panel_bytes = -(-groups // per_chunk) * 64 + groups * 256
    panels = np.zeros((-(-out // 16), panel_bytes), dtype=np.uint8)
    k = np.arange(n_in)
    q = k >> 1
    block = ((q >> 2) + q // (16 * per_chunk) + 1) * 64
    for o in range(out):
        p, c = divmod(o, 16)
        byte = block + 2 * (2 * c + (k & 1)) + ((q >> 1) & 1)
        np.bitwise_or.at(panels[p], byte, (codes[o].astype(np.uint16) << (4 * (q & 1))).astype(np.uint8))
        for g in range(scale_bytes.shape[1]):
            at = g // per_chunk * (64 + 256 * per_chunk) + g % per_chunk * (64 // per_chunk) + c * sb
            panels[p, at:at + sb] = scale_bytes[o, g]
    return panels


@pytest.mark.parametrize("storage, scale_dtype", [("int4_group", torch.bfloat16), ("int4_group", torch.float32),
                                                  ("mxfp4", None)])
def test_packed_4bit_layout_matches_model(storage, scale_dtype):
    """The packed bytes of a 4-bit storage (what pickles carry, versioned by PACKED_LAYOUT) are exactly
    the layout kernels.hpp describes, at H and I with partial groups and partial chunks of scales: a change
    of layout without a new version fails here, not only in the decoders."""
    from kt_functional import quant
    from kt_functional import state as state_module

    assert state_module.PACKED_LAYOUT == 3
    prob = make_problem(**CASES["awkward"], seed=11)
    E, H, I = prob.E, prob.H, prob.I
    if storage == "int4_group":
        tensors = [quant.quantize_int4_group(t.reshape(-1, t.shape[-1]), scale_dtype) for t in
                   (prob.gate, prob.up, prob.down)]
        tensors = [(c.reshape(E, -1, c.shape[-1]), s.reshape(E, -1, s.shape[-1])) for c, s in tensors]
    else:
        tensors = list(checkpoint(storage, prob))
    w = ktf().ExpertWeights.from_quantized(storage, *tensors)
    gate_up, down = (np.frombuffer(b, dtype=np.uint8) for b in w.packed.quantized_bytes())

    def codes_and_scales(codes, scales, n_in):  # one expert: uint8 codes [out, n_in], scale bytes [out, g, sb]
        if storage == "int4_group":
            words = codes.numpy().view(np.uint32)
            nibbles = (words[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
            c = (nibbles.reshape(words.shape[0], -1)[:, :n_in] ^ 8).astype(np.uint8)  # stored as q + 8
        else:
            b = codes.numpy().reshape(codes.shape[0], -1)
            c = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1)[:, :n_in].astype(np.uint8)
        raw = scales.contiguous().view(torch.uint8).numpy()
        return c, raw.reshape(scales.shape[0], scales.shape[1], scales.element_size())

    for e in range(E):
        g_panels, u_panels = (packed_4bit_panels(*codes_and_scales(t[0][e], t[1][e], H), H) for t in tensors[:2])
        want = np.stack([g_panels, u_panels], axis=1).reshape(-1)  # gate and up panels interleaved
        got = gate_up.reshape(E, -1)[e]
        assert np.array_equal(got, want), f"{storage} gate_up expert {e}: {np.count_nonzero(got != want)} bytes differ"
        want = packed_4bit_panels(*codes_and_scales(tensors[2][0][e], tensors[2][1][e], I), I).reshape(-1)
        got = down.reshape(E, -1)[e]
        assert np.array_equal(got, want), f"{storage} down expert {e}: {np.count_nonzero(got != want)} bytes differ"


def test_pickle_of_an_earlier_4bit_layout_is_refused():
    """A pickle of an earlier packed layout (1: without a version, before the 4-bit block layout; 2: before
    the 4-bit scales moved between the codes) would decode its 4-bit codes wrongly: loading it raises,
    naming the fix; int8 / fp8 bytes did not change."""
    from kt_functional import state as state_module

    prob = make_problem(E=2, H=64, I=32, k=1, T=3, r=2, seed=3)
    for storage in QUANTIZED:
        w = quantized_weights(prob, storage)
        fn, args = w.__reduce__()
        assert fn is state_module._unpickle_quantized and args[-1] == state_module.PACKED_LAYOUT == 3
        for layout, legacy in ((1, args[:-1]), (2, args[:-1] + (2,))):  # as earlier builds wrote them
            if storage in ("int4_group", "mxfp4"):
                with pytest.raises(ValueError, match=f"pickled {storage} ExpertWeights: packed layout {layout}"):
                    fn(*legacy)
            else:
                assert all(torch.equal(a, b) for a, b in zip(fn(*legacy).dequantize(), w.dequantize()))


# ---- checkpoint layouts written by the formats' own libraries ---------------------------------------------------

def test_compressed_tensors_pack_quantized():
    """int4_group from compressed-tensors' own quantize + pack_to_int32 (pack-quantized, group 32, symmetric)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    E, H, I = 3, 224, 96  # compressed-tensors needs in % group_size == 0; not multiples of 128
    gen = torch.Generator().manual_seed(0)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)

    def projection(out, inp):
        w = torch.randn(E, out, inp, generator=gen).bfloat16()
        groups = torch.nn.functional.pad(w.float(), (0, -inp % 32)).reshape(E, out, -1, 32)
        scale = (groups.abs().amax(-1) / 7.5).bfloat16()
        packed = torch.stack([pack_to_int32(quantize(w[e], scale[e], None, args, dtype=torch.int8), 4)
                              for e in range(E)])
        q = torch.stack([unpack_from_int32(packed[e], 4, torch.Size([out, inp])) for e in range(E)])
        return (packed, scale), q.float() * scale.float().repeat_interleave(32, -1)[..., :inp]

    (gate, g_ct), (up, u_ct), (down, d_ct) = projection(I, H), projection(I, H), projection(H, I)
    w = ktf().ExpertWeights.from_quantized("int4_group", gate, up, down)
    for mine, theirs in zip(w.dequantize(), (g_ct, u_ct, d_ct)):
        assert torch.equal(mine, theirs.bfloat16().float())
    # our quantizer writes the same int32 words as compressed-tensors for the same integers
    from kt_functional.quant import pack_int4

    q = torch.randint(-8, 8, (2, 5, 44), generator=gen, dtype=torch.int8)
    assert torch.equal(pack_int4(q), torch.stack([pack_to_int32(q[e], 4) for e in range(2)]))


def test_transformers_fp8_dequantization_agrees():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    prob = make_problem(E=2, H=300, I=136, k=1, T=1, r=1, seed=4)  # partial 128-blocks both ways
    gate, up, down = checkpoint("fp8_block", prob)
    w = ktf().ExpertWeights.from_quantized("fp8_block", gate, up, down)
    for mine, (codes, scale_inv) in zip(w.dequantize(), (gate, up, down)):
        theirs = _dequantize_fp8_weight(codes.clone(), scale_inv, [128, 128], torch.float32)
        assert torch.equal(mine, theirs.bfloat16().float())


def test_transformers_mxfp4_dequantization_agrees():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    prob = make_problem(E=2, H=128, I=96, k=1, T=1, r=1, seed=6)
    gate, up, down = checkpoint("mxfp4", prob)
    w = ktf().ExpertWeights.from_quantized("mxfp4", gate, up, down)
    for mine, (blocks, scales) in zip(w.dequantize(), (gate, up, down)):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # -> [E, out, in]
        assert torch.equal(mine, theirs.bfloat16().float())


# ---- errors -------------------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    K = ktf()
    prob = make_problem(E=2, H=64, I=40, k=1, T=1, r=1, seed=0)
    gate, up, down = checkpoint("int8", prob)
    with pytest.raises(ValueError, match="storage"):
        K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, storage="int3")
    with pytest.raises(ValueError, match="storage"):
        K.ExpertWeights.from_quantized("bf16", gate, up, down)
    with pytest.raises(ValueError, match="backward_weights"):
        K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, storage="int8", backward_weights="resident")
    with pytest.raises(TypeError, match=r"up\[0\].*int8"):
        K.ExpertWeights.from_quantized("int8", gate, (up[0].float(), up[1]), down)
    with pytest.raises(TypeError, match="down"):
        K.ExpertWeights.from_quantized("int8", gate, up, down[0])
    with pytest.raises(ValueError, match=r"up\[1\].*shape"):
        K.ExpertWeights.from_quantized("int8", gate, (up[0], up[1][:, :-1]), down)
    with pytest.raises(ValueError, match=r"gate\[1\].*finite"):
        bad = gate[1].clone()
        bad[0, 3] = float("inf")
        K.ExpertWeights.from_quantized("int8", (gate[0], bad), up, down)
    fp8 = checkpoint("fp8_block", prob)
    with pytest.raises(ValueError, match=r"down\[1\].*finite"):
        K.ExpertWeights.from_quantized("fp8_block", *fp8[:2], (fp8[2][0], torch.full_like(fp8[2][1], float("nan"))))
    with pytest.raises(ValueError, match=r"gate\[0\].*NaN"):
        codes = fp8[0][0].clone()
        codes.view(torch.uint8)[0, 0, 0] = 0x7F
        K.ExpertWeights.from_quantized("fp8_block", (codes, fp8[0][1]), *fp8[1:])
    mx = checkpoint("mxfp4", prob)
    with pytest.raises(ValueError, match=r"up\[1\].*255"):
        K.ExpertWeights.from_quantized("mxfp4", mx[0], (mx[1][0], torch.full_like(mx[1][1], 255)), mx[2])
    with pytest.raises(TypeError, match=r"gate\[1\].*uint8"):
        K.ExpertWeights.from_quantized("mxfp4", (mx[0][0], mx[0][1].float()), *mx[1:])
    i4 = checkpoint("int4_group", prob)
    # an `in` the packed words cannot hold: gate's words must be ceil(H / 8) = 8 per row
    with pytest.raises(ValueError, match=r"gate\[0\].*shape"):
        K.ExpertWeights.from_quantized("int4_group", (i4[0][0][..., :7], i4[0][1]), *i4[1:])
    with pytest.raises(TypeError, match=r"gate\[1\]"):
        K.ExpertWeights.from_quantized("int4_group", (i4[0][0], i4[0][1].to(torch.int32)), *i4[1:])


@pytest.mark.parametrize("storage", QUANTIZED)
@pytest.mark.parametrize("T", [1, 9, 40])
def test_forward_gemm_multiplies_by_code_times_scale(isa, storage, T):
    """The gate/up GEMM alone (moe_gate_up_forward, no LoRA: fp32 pre-activations straight from the
    accumulators) against x . W in float64, at H with partial 128-blocks and 32-groups. On FROM_CODES an
    expert with at most CODES_ROWS[storage] rows multiplies by MATH.md's code * scale itself, so its
    slots agree with the exact W to fp32 accumulation error (~1e-7); every other expert (and every expert
    elsewhere) multiplies by the decoded bf16(code * scale) = dequantize(), and agrees with that to the
    same precision. The bf16 rounding of W alone moves a result by ~1e-3, so the check tells them apart."""
    prob = make_problem(E=5, H=200, I=72, k=3, T=T, r=4, unused_frac=0.1, seed=31 + T)
    gate, up, down = checkpoint(storage, prob)
    weights = ktf().ExpertWeights.from_quantized(storage, gate, up, down)
    exact = [ref.dequantize_checkpoint(storage, t, prob.H).double() for t in (gate, up)]
    rounded = [w.double() for w in weights.dequantize()[:2]]
    from kt_functional import ops

    state = ktf().MoEState(weights, None, threads=2, isa=isa)
    out, _ = ops.moe_gate_up_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    x = prob.x.double()
    rows = torch.bincount(prob.ids[prob.ids >= 0], minlength=prob.E)
    from_codes = [isa in FROM_CODES and int(n) <= CODES_ROWS[storage] for n in rows]
    if T == 1:
        assert all(from_codes) == (isa in FROM_CODES)
    if T == 40:
        assert not any(from_codes), rows

    def expected(codes_w, decoded_w):  # W per expert as the kernels (or the other path) multiply by it
        want = torch.zeros(out.shape, dtype=torch.float64)
        for t, j in (prob.ids >= 0).nonzero().tolist():
            e = int(prob.ids[t, j])
            g, u = (codes_w if from_codes[e] else decoded_w)
            want[t, j] = torch.cat([g[e] @ x[t], u[e] @ x[t]])
        return want

    want, other = expected(exact, rounded), expected(rounded, exact)
    err, err_other = rel_err(out.double(), want), rel_err(out.double(), other)
    # mxfp4's values (two significant bits times a power of two) are bf16 values: nothing to tell apart.
    distinct = storage != "mxfp4"
    assert distinct == any(not torch.equal(a, b) for a, b in zip(exact, rounded))
    assert err < 1e-5 and (err_other > 1e-4 or not distinct), (
        f"[{isa}/{storage}/T={T}] {err:.2e} vs the other values {err_other:.2e} (rows per expert {rows.tolist()})")


@pytest.mark.parametrize("storage", QUANTIZED)
@pytest.mark.parametrize("T", [1, 9, 40])
def test_backward_gemm_multiplies_by_code_times_scale(isa, storage, T):
    """The backward's two GEMMs alone (the split path without LoRA, fp32 out: dh = w Wd^T gy, dx = the sum
    over a token's slots of [dg | du] [Wg; Wu]) against float64: an expert whose forward multiplies from the
    codes (test_forward_gemm_multiplies_by_code_times_scale) gets the gradient of that function, by code *
    scale itself; every other one by dequantize()'s bf16(code * scale). The two differ by ~1e-3."""
    prob = make_problem(E=5, H=200, I=72, k=3, T=T, r=4, unused_frac=0.1, seed=41 + T)
    prob.x = prob.x.float()  # dx in fp32
    tensors = checkpoint(storage, prob)
    weights = ktf().ExpertWeights.from_quantized(storage, *tensors)
    exact = [ref.dequantize_checkpoint(storage, t, n).double() for t, n in zip(tensors, (prob.H, prob.H, prob.I))]
    rounded = [w.double() for w in weights.dequantize()]
    h, dgu = split_inputs(prob)
    dgu = dgu.bfloat16().float()  # the kernels take gy and dg | du in bf16
    gy = make_gy(prob)
    down, gate_up = split_backwards(weights, prob, isa, None, h, dgu, gy)
    rows = torch.bincount(prob.ids[prob.ids >= 0], minlength=prob.E)
    from_codes = [isa in FROM_CODES and int(n) <= CODES_ROWS[storage] for n in rows]

    def expected(codes_w, decoded_w):
        dh = torch.zeros(down.x.shape, dtype=torch.float64)
        dx = torch.zeros(prob.T, prob.H, dtype=torch.float64)
        dgu64 = dgu.double()
        for t, j in (prob.ids >= 0).nonzero().tolist():
            e = int(prob.ids[t, j])
            g, u, d = codes_w if from_codes[e] else decoded_w
            dh[t, j] = prob.w[t, j].double() * (d[e].T @ gy[t].double())
            dx[t] += g[e].T @ dgu64[t, j, : prob.I] + u[e].T @ dgu64[t, j, prob.I:]
        return dh, dx

    want, other = expected(exact, rounded), expected(rounded, exact)
    distinct = storage != "mxfp4"  # mxfp4's values are bf16 values: nothing to tell apart
    for name, got, w_, o_ in (("dh", down.x, want[0], other[0]), ("dx", gate_up.x, want[1], other[1])):
        assert got.dtype == torch.float32
        err, err_other = rel_err(got.double(), w_), rel_err(got.double(), o_)
        assert err < 1e-5 and (err_other > 1e-4 or not distinct or not any(from_codes)), (
            f"[{isa}/{storage}/T={T}] {name}: {err:.2e} vs the other values {err_other:.2e} (rows {rows.tolist()})")


def every_code_checkpoint(storage, E, out, inp, seed=0):
    """A projection's checkpoint tensors whose codes run through every value the format has (NaN
    excepted) and whose scales are powers of two (some != 1), so code * scale is exact in fp32 and bf16."""
    g = torch.Generator().manual_seed(seed)
    n = E * out * inp
    if storage == "int8":
        codes = (torch.arange(n) % 256 - 128).to(torch.int8).reshape(E, out, inp)
        return codes, torch.exp2(torch.randint(-3, 4, (E, out), generator=g).float())
    if storage == "fp8_block":
        bits = torch.arange(n) % 256
        bits[(bits & 0x7F) == 0x7F] = 0  # the NaN codes
        codes = bits.to(torch.uint8).view(torch.float8_e4m3fn).reshape(E, out, inp)
        return codes, torch.exp2(torch.randint(-3, 4, (E, -(-out // 128), -(-inp // 128)), generator=g).float())
    if storage == "int4_group":
        words = torch.randint(-(2**31), 2**31, (E, out, inp // 8), generator=g, dtype=torch.int64).to(torch.int32)
        return words, torch.exp2(torch.randint(-3, 4, (E, out, inp // 32), generator=g).float()).bfloat16()
    blocks = torch.randint(0, 256, (E, out, inp // 32, 16), generator=g, dtype=torch.uint8)
    return blocks, torch.randint(120, 135, (E, out, inp // 32), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("storage", QUANTIZED)
def test_every_code_value_reaches_the_gemm(isa, storage):
    """One-hot tokens read the GEMM's weights out one input column at a time (moe_gate_up_forward: fp32
    outputs, no LoRA), so every code of the format is checked exactly: on every ISA path, in the GEMM
    straight from the codes (4 tokens per call; 16 for the 4-bit formats), in the one on K chunks decoded
    into L1 (16 tokens: 8-bit formats) and in the decoded-operand one (64), against MATH.md's code * scale."""
    E, I, H = 2, 64, 256
    gate, up = (every_code_checkpoint(storage, E, I, H, seed) for seed in (1, 2))
    down = every_code_checkpoint(storage, E, H, I, 3)
    weights = ktf().ExpertWeights.from_quantized(storage, gate, up, down)
    want = [ref.dequantize_checkpoint(storage, t, H) for t in (gate, up)]
    assert all(torch.equal(w, d) for w, d in zip(want, weights.dequantize()[:2])), "exact in bf16 by construction"
    from kt_functional import ops

    state = ktf().MoEState(weights, None, threads=2, isa=isa)
    for T in (4, 16, 64):
        for e in range(E):
            for i0 in range(0, H, T):
                x = torch.zeros(T, H, dtype=torch.bfloat16)
                x[torch.arange(T), i0 + torch.arange(T)] = 1
                ids = torch.full((T, 1), e)
                out, _ = ops.moe_gate_up_forward(state, x, ids, torch.ones(T, 1), save_for_backward=False)
                got = out[:, 0]  # [T, 2I]: column i0 + t of gate | up
                expected = torch.cat([want[0][e, :, i0 : i0 + T], want[1][e, :, i0 : i0 + T]]).T
                assert torch.equal(got, expected), f"[{isa}/{storage}] expert {e}, T={T}, columns {i0}.."


def test_results_do_not_depend_on_threads(isa):
    prob = make_problem(**CASES["awkward"], seed=21)
    gy = make_gy(prob)
    outs = []
    for storage in ("int8", "mxfp4"):
        weights = quantized_weights(prob, storage)
        for threads in (1, 2, 2):
            y, grads = fwd_bwd(ktf().MoEState(weights, make_lora(prob), threads=threads, isa=isa), prob.x, prob.ids,
                               prob.w, gy)
            outs.append((storage, y, grads_dict(grads)))
    for storage, y, g in outs:
        first = next(o for o in outs if o[0] == storage)
        assert torch.equal(y, first[1]) and all(torch.equal(t, first[2][k]) for k, t in g.items()), storage


@pytest.mark.parametrize("storage", ["int8", "int4_group"])
def test_partitioned_quantized_weights(isa, storage):
    """partitions=2: each slice of I quantized and packed on its own; matches the reference on dequantize()."""
    prob = make_problem(**CASES["wide"], seed=31)
    weights = ktf().ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, storage=storage, partitions=2)
    assert weights.partitions == 2 and weights.storage == storage
    *_, (gate, up, down) = check_dequantized_reference(weights, prob, isa, f"[{isa}/{storage}/partitions=2]")
    back = pickle.loads(pickle.dumps(weights))
    assert back.partitions == 2 and back.storage == storage
    assert all(torch.equal(a, b) for a, b in zip(back.dequantize(), (gate, up, down)))


@pytest.mark.parametrize("storage", ["int8", "mxfp4"])
@pytest.mark.parametrize("args", [dict(activation="swish", alpha=1.702, limit=6.0, up_offset=1.0),
                                  dict(gated=False, activation="relu")], ids=["gpt_oss", "nongated_relu"])
def test_quantized_expert_variants(isa, storage, args):
    """Variants and frozen biases run on quantized weights as on bf16 ones (reference on dequantize())."""
    from helpers import W_MAGNITUDE

    K = ktf()
    variant = K.ExpertVariant(**args)
    prob = make_problem(E=5, H=72, I=40, k=3, T=29, r=3, seed=41)
    gen = torch.Generator().manual_seed(2)
    biases = {"up": torch.randn(prob.E, prob.I, generator=gen) * 0.3,
              "down": torch.randn(prob.E, prob.H, generator=gen) * 0.3}
    weights = K.ExpertWeights.from_tensors(prob.gate * 3 if variant.gated else None, prob.up * 3, prob.down,
                                           storage=storage, variant=variant, up_bias=biases["up"],
                                           down_bias=biases["down"])
    assert weights.storage == storage and weights.variant == variant
    gate, up, down = weights.dequantize()
    gy = make_gy(prob)
    y, grads = fwd_bwd(K.MoEState(weights, make_lora(prob), threads=2, isa=isa), prob.x, prob.ids, prob.w, gy)
    refargs = (prob.x, prob.ids, prob.w, gate, up, down, prob.lora, prob.scale)
    y_ref = ref.moe_reference(*refargs, variant, biases)
    g_ref = ref.moe_reference_grads(*refargs, gy, variant, biases)
    g_ref[W_MAGNITUDE] = ref.dw_magnitude(*refargs, gy, variant, biases)
    assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}/{storage}/{variant}]")
    back = pickle.loads(pickle.dumps(weights))
    assert back.variant == variant and torch.equal(back.up_bias, weights.up_bias) and back.storage == storage
