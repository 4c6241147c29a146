"""A patched model behaves like a transformers model (issue 12, item 4): save_pretrained / from_pretrained,
state_dict round trips, deepcopy / pickle / torch.save, fp16 and bf16 models, set_experts_implementation and
unpatch_model. References: the unpatched model and the fp32 torch twin carrying the same LoRA."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from helpers import TOL, rel_err  # noqa: E402
from hf_models import batch, build, lora_grads, randomize_lora_b, torch_twin  # noqa: E402

from kt_functional import ExpertWeights, hf  # noqa: E402
from kt_functional.torch import KTExperts  # noqa: E402


def _patched(base, rank=4, alpha=8):
    model = hf.patch_model(copy.deepcopy(base), lora_rank=rank, lora_alpha=alpha)
    randomize_lora_b(model)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _sgd_step(model, ids, lr=0.5):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _safetensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


# ---- save_pretrained / from_pretrained / state_dict ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_save_pretrained_round_trip(arch, tmp_path):
    """save_pretrained writes the unpatched model's checkpoint (real experts) + the LoRA as a PEFT adapter;
    from_pretrained, patch_model, load_adapter give back the same logits exactly."""
    from transformers import AutoModelForCausalLM

    base = build(arch)
    model = _patched(base)
    ids = batch()
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path / "patched")
    base.save_pretrained(tmp_path / "base")

    ours, theirs = _safetensors(tmp_path / "patched"), _safetensors(tmp_path / "base")
    assert ours.keys() == theirs.keys()  # transformers' own names and format, no kt_experts keys
    for key, t in theirs.items():
        assert torch.equal(ours[key].float(), t.float()), key
    assert (tmp_path / "patched" / hf.ADAPTER_SUBDIR / "adapter_config.json").exists()

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "patched", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded.eval()
    assert torch.equal(_logits(reloaded, ids), _logits(base, ids))
    hf.patch_model(reloaded, lora_rank=2)
    hf.load_adapter(reloaded, tmp_path / "patched" / hf.ADAPTER_SUBDIR)
    assert torch.equal(_logits(reloaded, ids), ref)


def test_save_pretrained_without_lora_writes_no_adapter(tmp_path):
    base = build("qwen3_moe")
    model = hf.patch_model(copy.deepcopy(base), lora_rank=None)
    model.save_pretrained(tmp_path / "patched")
    base.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "patched" / hf.ADAPTER_SUBDIR).exists()
    assert _safetensors(tmp_path / "patched").keys() == _safetensors(tmp_path / "base").keys()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_state_dict_round_trip(arch):
    """state_dict() = the unpatched model's keys + the LoRA keys; load_state_dict packs the base experts it holds."""
    base = build(arch)
    model = _patched(base)
    state = model.state_dict()
    lora_keys = {k for k in state if ".kt_experts." in k}
    assert len(lora_keys) == 6 * len(hf.kt_layers(model))
    assert state.keys() - lora_keys == base.state_dict().keys()
    gate_up = next(k for k in state if k.endswith("experts.gate_up_proj"))
    assert state[gate_up].dtype == torch.bfloat16 and torch.equal(state[gate_up].float(), base.state_dict()[gate_up])

    other = _patched(build(arch, seed=5), rank=4)  # other base experts, other LoRA
    ids = batch()
    assert not torch.equal(_logits(other, ids), _logits(model, ids))
    other.load_state_dict(state)
    assert torch.equal(_logits(other, ids), _logits(model, ids))

    half = {k: v for k, v in state.items() if not k.endswith("experts.down_proj")}
    with pytest.raises(ValueError, match="gate_up_proj without .*down_proj"):
        other.load_state_dict(half)


# ---- deepcopy / pickle / torch.save ---------------------------------------------------------------------------------

def _check_independent_copy(model, clone, ids):
    """clone computes what model computes, shares no LoRA storage, and trains independently."""
    ref = _logits(model, ids)
    assert torch.equal(_logits(clone, ids), ref)
    ours, theirs = dict(hf.kt_layers(model)), dict(hf.kt_layers(clone))
    assert ours.keys() == theirs.keys()
    for path, kt in ours.items():
        assert theirs[path]._layer != kt._layer
        assert theirs[path].gate_b.data_ptr() != kt.gate_b.data_ptr()
    assert clone.save_pretrained.model is clone  # saves the clone, not the original
    _sgd_step(clone, ids)
    assert torch.equal(_logits(model, ids), ref)
    assert rel_err(_logits(clone, ids), ref) > 1e-4  # the step changed the clone


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_deepcopy_shares_packed_weights_copies_lora(arch):
    model = _patched(build(arch))
    clone = copy.deepcopy(model)
    for (_, kt), (_, kt2) in zip(hf.kt_layers(model), hf.kt_layers(clone)):
        assert kt2.weights is kt.weights  # immutable: shared, not repacked
    ids = batch()
    _check_independent_copy(model, clone, ids)
    ref = _logits(clone, ids)
    del model  # the copy has its own layer ids: it outlives the original
    assert torch.equal(_logits(clone, ids), ref)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_pickle_and_torch_save(arch, how):
    model = _patched(build(arch))
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    for (_, kt), (_, kt2) in zip(hf.kt_layers(model), hf.kt_layers(clone)):
        assert kt2.weights is not kt.weights
        assert all(torch.equal(a, b) for a, b in zip(kt2.weights.dequantize(), kt.weights.dequantize()))
    _check_independent_copy(model, clone, batch())


def test_expert_weights_pickle_is_exact():
    gate_up, down = torch.randn(3, 2 * 24, 40), torch.randn(3, 40, 24)
    w = ExpertWeights.from_fused(gate_up, down, backward_weights="resident")
    w2 = pickle.loads(pickle.dumps(w))
    assert w2.backward_weights == "resident" and copy.copy(w) is w and copy.deepcopy(w) is w
    assert all(torch.equal(a, b) for a, b in zip(w2.dequantize(), w.dequantize()))


# ---- fp16 / bf16 ----------------------------------------------------------------------------------------------------

def _loss_logits_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), lora_grads(model)


def _check_vs_twin(model, twin, ids, dtype):
    loss, logits, grads = _loss_logits_grads(model, ids)
    ref_loss, ref_logits, ref_grads = _loss_logits_grads(twin, ids)
    assert logits.dtype == dtype
    assert rel_err(logits.float(), ref_logits) <= TOL
    assert abs(loss.float() - ref_loss) / ref_loss <= TOL
    assert grads.keys() == ref_grads.keys()
    for key, g in grads.items():
        assert g.dtype == dtype, key  # LoRA parameters in dtype get their gradients in dtype
        assert rel_err(g.float(), ref_grads[key]) <= TOL, key


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_half_after_patching(arch):
    """model.half() after patch_model: fp16 in, fp16 out, fp16 LoRA gradients, within MATH.md's tolerance of the
    fp32 torch twin."""
    base = build(arch)
    model = _patched(base)
    twin = torch_twin(base, model)
    model.half()
    _check_vs_twin(model, twin, batch(), torch.float16)


def test_fp16_model_patched():
    """A model in fp16 (as from_pretrained(dtype=torch.float16) gives), then patched: fp32 LoRA, fp16 logits."""
    base = build("qwen3_moe")
    model = hf.patch_model(copy.deepcopy(base).half(), lora_rank=4, lora_alpha=8)
    randomize_lora_b(model)
    assert {kt.gate_a.dtype for _, kt in hf.kt_layers(model)} == {torch.float32}
    twin = torch_twin(base, model)
    ids = batch()
    logits = _logits(model, ids)
    assert logits.dtype == torch.float16
    assert rel_err(logits.float(), _logits(twin, ids)) <= TOL


def test_bfloat16_after_patching():
    """model.to(torch.bfloat16) after patch_model equals the same bf16 model unpatched with the LoRA (twin in bf16)."""
    base = build("qwen3_moe")
    model = _patched(base)
    twin = torch_twin(base, model).to(torch.bfloat16)
    model.to(torch.bfloat16)
    _check_vs_twin(model, twin, batch(), torch.bfloat16)


def test_kt_experts_fp16_inputs():
    """KTExperts on its own: fp16 hidden states and routing weights in, fp16 out and fp16 gradients."""
    gate_up, down = torch.randn(4, 2 * 16, 32) * 0.1, torch.randn(4, 32, 16) * 0.1
    kt = KTExperts(ExpertWeights.from_fused(gate_up, down), lora_rank=2)
    x = torch.randn(5, 32)
    ids = torch.randint(0, 4, (5, 2))
    w = torch.rand(5, 2)
    x16, w16 = x.half().requires_grad_(), w.half().requires_grad_()
    y16 = kt(x16, ids, w16)
    y16.float().square().sum().backward()
    xf, wf = x16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    y = kt(xf, ids, wf)
    y.square().sum().backward()
    assert y16.dtype == torch.float16 and x16.grad.dtype == torch.float16 and w16.grad.dtype == torch.float16
    assert torch.equal(y16, y.half())  # computed as the fp32 inputs, rounded once
    assert rel_err(x16.grad.float(), xf.grad) <= TOL and rel_err(w16.grad.float(), wf.grad) <= TOL


# ---- set_experts_implementation / unpatch_model -------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_other_implementation_after_patching_names_unpatch_model(impl):
    model = _patched(build("qwen3_moe"))
    ids = batch()
    model.set_experts_implementation(impl)
    with pytest.raises(RuntimeError, match=f"experts_implementation='{impl}'.*kt_functional.hf.unpatch_model"):
        model(ids)
    model.set_experts_implementation(hf.EXPERTS_IMPLEMENTATION)
    assert _logits(model, ids).isfinite().all()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_unpatch_model_merge_lora(arch):
    """unpatch_model(merge_lora=True): torch parameters again, LoRA merged; every implementation gives the
    patched model's logits."""
    base = build(arch)
    before = base.config._experts_implementation
    model = _patched(base)
    ids = batch()
    ref = _logits(model, ids)
    assert hf.unpatch_model(model, merge_lora=True) is model
    assert not hf.kt_layers(model) and not any(isinstance(m, KTExperts) for m in model.modules())
    assert model.config._experts_implementation == before
    assert model.state_dict().keys() == base.state_dict().keys()
    params = dict(model.named_parameters())
    experts = [n for n in params if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts and all(params[n].dtype == torch.float32 and not params[n].requires_grad for n in experts)
    far = rel_err(_logits(base, ids), ref)
    for impl in ["eager", "grouped_mm", "batched_mm"]:
        model.set_experts_implementation(impl)
        err = rel_err(_logits(model, ids), ref)
        assert err <= TOL and far > 10 * err, (impl, err, far)  # the merged LoRA is there


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_unpatch_model_drops_lora(arch, tmp_path):
    """unpatch_model() gives the base model back exactly: same logits, plain save_pretrained, patchable again."""
    base = build(arch)
    model = _patched(base)
    ids = batch()
    model.set_experts_implementation("eager")  # switched before unpatching: the user's choice is kept
    hf.unpatch_model(model)
    assert model.config._experts_implementation == "eager"
    for impl in ["eager", "grouped_mm", "batched_mm"]:
        model.set_experts_implementation(impl)
        base.set_experts_implementation(impl)
        assert torch.equal(_logits(model, ids), _logits(base, ids)), impl
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / hf.ADAPTER_SUBDIR).exists()
    again = _patched(model)
    assert rel_err(_logits(again, ids), _logits(torch_twin(base, again), ids)) <= TOL


def test_unpatch_model_keeps_dtype_of_the_model():
    model = _patched(build("qwen3_moe")).to(torch.bfloat16)
    hf.unpatch_model(model, merge_lora=True)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert _logits(model, batch()).dtype == torch.bfloat16


def test_unpatch_model_errors(monkeypatch):
    base = build("olmoe")
    with pytest.raises(ValueError, match="no kt-functional experts"):
        hf.unpatch_model(copy.deepcopy(base))
    with pytest.raises(TypeError, match="merge_lora: expected a bool"):
        hf.unpatch_model(_patched(base), merge_lora="yes")
    monkeypatch.setattr(hf, "_has_experts_interface", lambda: False)
    replaced = _patched(base)
    with pytest.raises(ValueError, match="replaced by a KTExperts.*experts interface"):
        hf.unpatch_model(replaced)
