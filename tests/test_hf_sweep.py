"""Every MoE architecture the installed transformers runs through its experts interface: a tiny model from
its config class (tests/hf_sweep.py), patched, against the unpatched model carrying the same LoRA (the torch
twin, which runs the experts module's own gate function and layout, replaying the patched run's top-k
decisions): logits and input-embedding gradients within MATH.md's tolerance. Kernels run on the default ISA here; every variant on every ISA path is covered
by tests/test_variants.py."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from helpers import TOL, rel_err  # noqa: E402
from hf_models import randomize_lora_b  # noqa: E402
from hf_sweep import _experts_modules, build, experts_classes, layer_errors, run  # noqa: E402

from kt_functional import hf  # noqa: E402

CLASSES = experts_classes()

# Experts classes the kernels do not run, and why (patch_model must refuse them naming the property).
UNSUPPORTED = {
    "MuseSparkExperts": "has_post_expert_norm",
}
# Experts classes whose gate function no epilogue computes: they run on the split path.
SPLIT = {"Inkling2Experts", "Inkling2LoopExperts"}


# Tiny random models whose own input-embedding gradient moves by several % when the experts outputs move by
# bf16 rounding (0.3%): Gemma-4's MoE output goes through an RMSNorm and a router with a large scale. For them
# the layer-level check (every experts call, the same inputs, MATH.md's tolerance) is the strict one, and the
# end-to-end gradient must stay within twice the twin's own deviation under 0.3% output noise.
ILL_CONDITIONED = {"Gemma4TextExperts", "DiffusionGemmaTextExperts"}


def test_the_sweep_sees_the_interface():
    """transformers registers dozens of experts classes; the sweep must find them (not an empty list)."""
    assert len(CLASSES) >= 60, CLASSES


@pytest.mark.parametrize("family, module, experts", CLASSES, ids=[f"{f}-{e}" for f, _, e in CLASSES])
def test_architecture(family, module, experts):
    try:
        base, _ = build(family, module, experts)
    except RuntimeError as e:
        pytest.skip(f"{experts}: no tiny model builds from the config class ({e})")
    base.requires_grad_(False)
    if experts in UNSUPPORTED:
        with pytest.raises(ValueError, match=rf"\({experts}\) has .*{UNSUPPORTED[experts]}.*kt-functional supports"):
            hf.patch_model(copy.deepcopy(base), lora_rank=4)
        print(f"\n{experts}: unsupported ({UNSUPPORTED[experts]}), refused with a clear error")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf.patch_model(copy.deepcopy(base), lora_rank=4, lora_alpha=8)
    randomize_lora_b(model)
    twin = hf.torch_lora_twin(base, model, bf16_inputs=True)
    layers = hf.kt_layers(model)
    assert layers and all(type(model.get_submodule(path)).__name__ == experts for path, _ in layers)
    assert all((kt.gate_fn is not None) == (experts in SPLIT) for _, kt in layers)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    y, g, routes, calls = run(model, ids)
    y_ref, g_ref, _, twin_calls = run(twin, ids, routes)
    layers = layer_errors(calls, twin_calls)
    # each experts call, the same inputs: y, dx and the routing weights' gradient dw
    assert max(max(e) for e in layers) <= TOL, layers
    assert rel_err(y, y_ref) <= TOL, rel_err(y, y_ref)
    bound = 2 * output_noise_sensitivity(twin, ids, routes) if experts in ILL_CONDITIONED else TOL
    if rel_err(g, g_ref) > bound:  # says whether a rerun of the patched model on the same inputs repeats it
        again = rel_err(run(model, ids, routes)[1], g_ref)
        pytest.fail(f"{experts}: input-embedding gradient rel. error {rel_err(g, g_ref):.3g} > {bound:.3g} (a rerun "
                    f"of the patched model: {again:.3g}); each experts call's y, dx, dw errors: {layers}")


def output_noise_sensitivity(twin, ids, routes) -> float:
    """How far the twin's own input-embedding gradient moves when every experts output gets 0.3% relative
    noise (the size of bf16 operand rounding)."""
    noisy = copy.deepcopy(twin)
    gen = torch.Generator().manual_seed(5)
    for module in _experts_modules(noisy):
        module.register_forward_hook(lambda m, a, o: o * (1 + 0.003 * torch.randn(o.shape, generator=gen)))
    _, g, _, _ = run(twin, ids, routes)
    _, g_noisy, _, _ = run(noisy, ids, routes)
    return rel_err(g_noisy, g)


@pytest.mark.parametrize("family", ["gpt_oss", "nemotron_h"])
def test_variant_layouts_behave_like_transformers_models(family):
    """Transposed, interleaved, biased (gpt-oss) and non-gated (Nemotron-H) experts: state_dict in the module's
    own names and layout loads back exactly, pickling keeps the variant, unpatch_model(merge_lora=True) gives
    torch experts computing what the patched model computes, and the PEFT adapter format refuses them clearly."""
    import pickle

    (fam, module, experts), = [c for c in CLASSES if c[0] == family][:1]
    base, _ = build(fam, module, experts)
    base.requires_grad_(False)
    model = hf.patch_model(copy.deepcopy(base), lora_rank=4, lora_alpha=8)
    randomize_lora_b(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(m):
        with torch.no_grad():
            return m(ids).logits

    y = logits(model)
    state = model.state_dict()
    path = hf.kt_layers(model)[0][0]
    names = {k.removeprefix(path + ".") for k in state if k.startswith(path + ".") and ".kt_experts." not in k}
    assert names == set(hf.kt_layers(model)[0][1].experts_layout.names)
    for name in names:  # the module's own layout: what the unpatched module holds
        assert state[f"{path}.{name}"].shape == base.get_submodule(path).get_parameter(name).shape
    reloaded = hf.patch_model(copy.deepcopy(base), lora_rank=4, lora_alpha=8)
    reloaded.load_state_dict(state)
    assert torch.equal(logits(reloaded), y)
    assert torch.equal(logits(pickle.loads(pickle.dumps(model))), y)
    assert rel_err(logits(hf.unpatch_model(copy.deepcopy(model), merge_lora=True)), y) <= TOL
    with pytest.raises(ValueError, match="PEFT adapter format.*unpatch_model"):
        hf.save_adapter(model, "/nonexistent")
