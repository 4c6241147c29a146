"""Expert variants (MATH.md "Expert variants") against the float32 reference on every ISA path:
gated activations, non-gated experts, gpt-oss and DeepSeek-V4 clamped SwiGLU, frozen biases,
transposed / interleaved storage read straight into the packed layout, and sentinel expert ids."""

from __future__ import annotations

import pytest
import torch

from helpers import W_MAGNITUDE, assert_matches_reference, fwd_bwd, ktf, make_gy, make_lora, make_problem, ref

SHAPE = dict(E=5, H=72, I=40, k=3, T=29, r=3, unused_frac=0.2)

# name -> ExpertVariant arguments, with biases or not
VARIANTS = {
    "silu_bias": (dict(), True),
    "gelu": (dict(activation="gelu"), False),
    "gelu_tanh": (dict(activation="gelu_tanh"), False),
    "quick_gelu": (dict(activation="quick_gelu"), True),
    "nongated_relu2": (dict(gated=False, activation="relu2"), False),
    "nongated_relu": (dict(gated=False, activation="relu"), True),
    "nongated_gelu": (dict(gated=False, activation="gelu"), False),
    "nongated_silu": (dict(gated=False, activation="silu"), False),
    "gpt_oss": (dict(activation="swish", alpha=1.702, limit=6.0, up_offset=1.0), True),
    "deepseek_v4": (dict(activation="silu", limit=6.0), False),
}
# The clamps' limits sit where ~5% of the pre-activations (std ~3 below) are clamped. A clamp's gradient is
# discontinuous: an entry whose fp32 pre-activation differs from the reference's by rounding (bf16 operands,
# the LoRA expand's bf16 coefficients) across the limit gets a full-size gradient error, so a limit inside the
# bulk of the distribution (half the entries near it) would exceed 1e-2 on the LoRA gradients for some seeds.


def _biases(prob, gated, seed):
    gen = torch.Generator().manual_seed(seed)
    b = {"up": torch.randn(prob.E, prob.I, generator=gen) * 0.3, "down": torch.randn(prob.E, prob.H, generator=gen) * 0.3}
    if gated:
        b["gate"] = torch.randn(prob.E, prob.I, generator=gen) * 0.3
    return b


def _with_sentinels(ids, E):
    """Some slots routed to expert-parallel sentinels (E and beyond): skipped like -1."""
    ids = ids.clone()
    ids[1::4, 0] = E
    ids[2::5, -1] = E + 7
    return ids


def _check(isa, name, seed, *, weights_from=None, partitions=1):
    K = ktf()
    args, with_bias = VARIANTS[name]
    variant = K.ExpertVariant(**args)
    prob = make_problem(**SHAPE, seed=seed)
    # O(1) pre-activations, larger than the clamps' limits for some entries
    gate, up = prob.gate * 3, prob.up * 3
    biases = _biases(prob, variant.gated, seed) if with_bias else {}
    ids = _with_sentinels(prob.ids, prob.E)
    make = weights_from or (lambda g, u, d, **kw: K.ExpertWeights.from_tensors(g, u, d, partitions=partitions, **kw))
    weights = make(gate if variant.gated else None, up, prob.down, variant=variant, gate_bias=biases.get("gate"),
                   up_bias=biases.get("up"), down_bias=biases.get("down"))
    state = K.MoEState(weights, make_lora(prob), threads=2, isa=isa)
    gy = make_gy(prob)
    y, grads = fwd_bwd(state, prob.x, ids, prob.w, gy)
    y_ref = ref.moe_reference(prob.x, ids, prob.w, gate, up, prob.down, prob.lora, prob.scale, variant, biases)
    args = (prob.x, ids, prob.w, gate, up, prob.down, prob.lora, prob.scale, gy, variant, biases)
    g_ref = ref.moe_reference_grads(*args)
    g_ref[W_MAGNITUDE] = ref.dw_magnitude(*args)
    assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}/{name}]")
    if not variant.gated:
        assert torch.all(grads.lora.gate_a == 0) and torch.all(grads.lora.gate_b == 0)
    sentinel = ids >= prob.E
    assert sentinel.any() and torch.all(grads.w[sentinel] == 0)
    return variant


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_reference(isa, name):
    _check(isa, name, seed=300 + list(VARIANTS).index(name))


@pytest.mark.parametrize("name", ["gpt_oss", "nongated_relu"])
def test_variant_with_partitions(name):
    """Partitions of I: the gate / up biases are sliced with them, the down bias and its dw term come once."""
    _check(None, name, seed=350, partitions=2)


def test_clamps_are_active():
    """The gpt-oss / DeepSeek-V4 cases above clamp a share of the pre-activations."""
    prob = make_problem(**SHAPE, seed=300)
    g = torch.einsum("th,eih->tei", prob.x.float(), (prob.gate * 3).float())
    assert 0.02 < (g.abs() > 6.0).float().mean() < 0.1


def test_transposed_interleaved_storage(isa):
    """gpt-oss's storage: gate_up [E, H, 2I] with gate / up columns interleaved, down [E, I, H]: strided
    views packed straight (no copy), the same results as contiguous tensors."""
    K = ktf()

    def from_gpt_oss_layout(gate, up, down, **kw):
        E, I, H = up.shape
        gate_up = torch.empty(E, H, 2 * I, dtype=up.dtype)
        gate_up[..., ::2], gate_up[..., 1::2] = gate.transpose(1, 2), up.transpose(1, 2)
        down_t = down.transpose(1, 2).contiguous()  # [E, I, H]
        return K.ExpertWeights.from_tensors(gate_up[..., ::2].transpose(1, 2), gate_up[..., 1::2].transpose(1, 2),
                                            down_t.transpose(1, 2), **kw)

    _check(isa, "gpt_oss", seed=400, weights_from=from_gpt_oss_layout)


def test_variant_validation():
    K = ktf()
    with pytest.raises(ValueError, match="activation"):
        K.ExpertVariant(activation="tanh")
    with pytest.raises(ValueError, match="alpha"):
        K.ExpertVariant(activation="swish")
    with pytest.raises(ValueError, match="alpha"):
        K.ExpertVariant(activation="silu", alpha=2.0)
    with pytest.raises(ValueError, match="limit"):
        K.ExpertVariant(gated=False, activation="relu", limit=1.0)
    with pytest.raises(ValueError, match="limit"):
        K.ExpertVariant(limit=-1.0)
    prob = make_problem(**SHAPE, seed=1)
    with pytest.raises(ValueError, match="gate"):
        K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, variant=K.ExpertVariant(gated=False))
    with pytest.raises(ValueError, match="down_bias"):
        K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, down_bias=torch.zeros(prob.E, prob.I))
    with pytest.raises(TypeError, match="variant"):
        K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, variant="silu")


def test_variant_weights_pickle():
    """A copy made by pickling keeps the variant and the biases."""
    import pickle

    K = ktf()
    prob = make_problem(**SHAPE, seed=2)
    v = K.ExpertVariant(activation="swish", alpha=1.702, limit=7.0, up_offset=1.0)
    w = K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, variant=v, up_bias=torch.ones(prob.E, prob.I))
    w2 = pickle.loads(pickle.dumps(w))
    assert w2.variant == v and torch.equal(w2.up_bias, w.up_bias) and w2.gate_bias is None
    nongated = K.ExpertWeights.from_tensors(None, prob.up, prob.down, variant=K.ExpertVariant(gated=False,
                                                                                             activation="relu2"))
    assert pickle.loads(pickle.dumps(nongated)).variant.gated is False


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_gelu_flavours_are_told_apart(name):
    """gelu (erf) and gelu_tanh differ by < 1e-3 near 0 (below MATH.md's tolerance) but by ~20% at g ~ -3.5:
    with small gate weights and a gate bias of -3.5 the layer matches its own flavour's reference only."""
    K = ktf()
    other = {"gelu": "gelu_tanh", "gelu_tanh": "gelu"}[name]
    prob = make_problem(**SHAPE, seed=500)
    gate, gate_bias = prob.gate * 0.1, torch.full((prob.E, prob.I), -3.5)
    weights = K.ExpertWeights.from_tensors(gate, prob.up, prob.down, variant=K.ExpertVariant(activation=name),
                                           gate_bias=gate_bias)
    state = K.MoEState(weights, None, threads=2, isa="amx_emulated")
    y, _ = K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    errs = {a: ref.rel_err(y, ref.moe_reference(prob.x, prob.ids, prob.w, gate, prob.up, prob.down,
                                                 variant=K.ExpertVariant(activation=a), biases={"gate": gate_bias}))
            for a in (name, other)}
    assert errs[name] <= 1e-2 and errs[other] > 10 * errs[name], errs


def _softcapped(g, u):  # a gate function no epilogue computes (Inkling2's softcapped SwiGLU, caps 3)
    return 3.0 * torch.tanh(g / 3.0) * torch.sigmoid(g) * 3.0 * torch.tanh(u / 3.0)


def test_split_path_matches_reference(isa):
    """The split path: the kernels' gate/up part (LoRA, biases), a gate function in torch under autograd, the
    kernels' down part; y, dx, dw and all six LoRA gradients vs the reference with that gate function."""
    from kt_functional import ops

    K = ktf()
    prob = make_problem(**SHAPE, seed=600)
    biases = _biases(prob, True, 600)
    ids = _with_sentinels(prob.ids, prob.E)
    weights = K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, gate_bias=biases["gate"],
                                           up_bias=biases["up"], down_bias=biases["down"])
    state = K.MoEState(weights, make_lora(prob), threads=2, isa=isa)
    gy = make_gy(prob)
    gate_up, gate_up_cache = ops.moe_gate_up_forward(state, prob.x, ids, prob.w)
    assert gate_up.shape == (prob.T, prob.k, 2 * prob.I) and torch.all(gate_up[ids >= prob.E] == 0)
    gate_up.requires_grad_(True)
    h = _softcapped(gate_up[..., :prob.I], gate_up[..., prob.I:])
    y, down_cache = ops.moe_down_forward(state, h.detach(), ids, prob.w)
    down = ops.moe_down_backward(state, down_cache, gy)
    h.backward(down.x)
    gate = ops.moe_gate_up_backward(state, gate_up_cache, gate_up.grad)
    assert gate.w is None and down_cache.consumed and gate_up_cache.consumed
    lora = {n: getattr(down.lora if n.startswith("down") else gate.lora, n) for n in prob.lora}
    grads = ops.Grads(x=gate.x, w=down.w, lora=ops.LoRAGrads(**lora))
    args = (prob.x, ids, prob.w, prob.gate, prob.up, prob.down, prob.lora, prob.scale, gy, _softcapped, biases)
    y_ref = ref.moe_reference(*args[:8], _softcapped, biases)
    g_ref = ref.moe_reference_grads(*args)
    g_ref[W_MAGNITUDE] = ref.dw_magnitude(*args)
    assert_matches_reference(y, grads, y_ref, g_ref, where=f"[{isa}/split]")
    with pytest.raises(TypeError, match="cache"):
        ops.moe_down_backward(state, gate_up_cache, gy)


def test_clamp_decisions_are_cached():
    """The backward uses the forward's clamp decisions (made on fp32), not new ones on the bf16-rounded
    cache: pre-activations placed within a bf16 rounding step of the limit get the reference's gradients."""
    K = ktf()
    prob = make_problem(E=2, H=32, I=16, k=1, T=64, r=2, seed=7)
    limit = 1.0
    # every pre-activation in (limit - 2^-9, limit + 2^-9): bf16 rounds them all to 1.0 (one rounding step)
    gate_bias = torch.full((prob.E, prob.I), limit)
    up_bias = torch.full((prob.E, prob.I), limit)
    gate, up = prob.gate * 1e-3, prob.up * 1e-3
    variant = K.ExpertVariant(activation="silu", limit=limit)
    weights = K.ExpertWeights.from_tensors(gate, up, prob.down, variant=variant, gate_bias=gate_bias,
                                           up_bias=up_bias)
    state = K.MoEState(weights, None, threads=2, isa="amx_emulated")
    gy = make_gy(prob)
    y, grads = fwd_bwd(state, prob.x, prob.ids, prob.w, gy)
    biases = {"gate": gate_bias, "up": up_bias}
    args = (prob.x, prob.ids, prob.w, gate, up, prob.down, None, None, gy, variant, biases)
    g_ref = ref.moe_reference_grads(*args)
    g_ref[W_MAGNITUDE] = ref.dw_magnitude(*args)
    assert_matches_reference(y, grads, ref.moe_reference(*args[:8], variant, biases), g_ref, where="[at the limit]")
