"""kt_functional.hf: patch_model on every supported architecture, checkpoint streaming, PEFT adapters,
gradient checkpointing and accumulation. References are plain fp32 torch twins (TorchLoRAExperts)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from helpers import TOL, rel_err, run_python_json  # noqa: E402
from hf_models import TINY_CONFIGS, batch, build, lora_grads, randomize_lora_b, tiny_config, torch_twin  # noqa: E402

from kt_functional import ExpertWeights, hf  # noqa: E402
from kt_functional.torch import KTExperts, live_residuals  # noqa: E402

ARCHS = list(TINY_CONFIGS)


def _patched(base, **kw):
    model = hf.patch_model(copy.deepcopy(base), lora_rank=kw.pop("lora_rank", 4), lora_alpha=kw.pop("lora_alpha", 8),
                           **kw)
    randomize_lora_b(model)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_matches_torch_lora(arch):
    base = build(arch)
    model = _patched(base)
    twin = torch_twin(base, model)
    ids = batch()
    # Only the routed experts moved: routers, shared experts, norms and attention are the same modules.
    kinds = {n: type(m).__name__ for n, m in base.named_modules() if "experts" not in n}
    assert {n: type(m).__name__ for n, m in model.named_modules() if "experts" not in n} == kinds
    assert not [n for n, _ in model.named_parameters() if n.endswith(("gate_up_proj", "experts.down_proj"))]
    layers = hf.kt_layers(model)
    assert layers and all(path.endswith("experts") for path, _ in layers)
    assert model.get_submodule(layers[0][0]).config._experts_implementation == hf.EXPERTS_IMPLEMENTATION
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".kt_experts." in n for n in trainable)

    with torch.no_grad():
        assert rel_err(model(ids).logits, twin(ids).logits) <= TOL
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(twin, ids)
    assert abs(loss - ref_loss) / ref_loss <= TOL
    assert grads.keys() == ref_grads.keys()
    for key, g in grads.items():
        assert rel_err(g, ref_grads[key]) <= TOL, key


def test_model_without_experts_is_an_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no routed-experts module"):
        hf.patch_model(AutoModelForCausalLM.from_config(cfg))
    with pytest.raises(TypeError, match="model:"):
        hf.patch_model(torch.nn.Linear(2, 2))


def _softcapped_gate(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return 3.0 * torch.tanh(gate / 3.0) * torch.sigmoid(gate) * up


@pytest.mark.parametrize("change, match", [
    (dict(has_post_expert_norm=True), r"mlp\.experts \(Qwen3MoeExperts\) has has_post_expert_norm=True; "
                                      r"kt-functional supports has_post_expert_norm in \[False\]"),
    (dict(is_transposed="yes"), r"has is_transposed='yes'; kt-functional supports is_transposed in \[True, False\]"),
])
def test_unsupported_experts_property_is_named(change, match):
    """Support is decided by the experts module's properties; an unsupported one is named with the supported values,
    before any layer is changed."""
    model = build("qwen3_moe")
    for key, value in change.items():
        setattr(model.model.layers[1].mlp.experts, key, value)
    with pytest.raises(ValueError, match=match):
        hf.patch_model(model)
    assert not hf.kt_layers(model)


@pytest.mark.parametrize("change", [dict(_apply_gate=_softcapped_gate), dict(act_fn=torch.nn.Tanh())],
                         ids=["softcapped_apply_gate", "tanh_act_fn"])
def test_split_path_runs_the_modules_own_gate(change):
    """A gate function the epilogues do not compute (a custom _apply_gate, an unknown act_fn) runs in torch
    between the kernels' gate/up and down calls: logits, loss and every LoRA gradient match the torch twin."""
    base = build("qwen3_moe")
    for layer in base.model.layers:
        for key, value in change.items():
            setattr(layer.mlp.experts, key, value)
    model = _patched(base)
    assert all(kt.gate_fn is not None for _, kt in hf.kt_layers(model))
    twin = torch_twin(base, model)
    ids = batch()
    with torch.no_grad():
        assert rel_err(model(ids).logits, twin(ids).logits) <= TOL
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(twin, ids)
    assert abs(loss - ref_loss) / ref_loss <= TOL
    for key, g in grads.items():
        assert rel_err(g, ref_grads[key]) <= TOL, key


def test_activation_read_from_the_module():
    """The activation comes from the experts module's act_fn (not a config field): an experts module whose act_fn
    computes gelu runs gelu(g) * u, and its results match the torch twin (which calls the module's act_fn)."""
    from transformers.activations import ACT2FN

    base = build("qwen3_moe")
    for layer in base.model.layers:
        layer.mlp.experts.act_fn = ACT2FN["gelu_pytorch_tanh"]
    assert base.config.hidden_act == "silu"
    model = _patched(base)
    assert {kt.weights.variant.activation for _, kt in hf.kt_layers(model)} == {"gelu_tanh"}
    twin = torch_twin(base, model)
    ids = batch()
    with torch.no_grad():
        assert rel_err(model(ids).logits, twin(ids).logits) <= TOL


def test_patch_twice_is_an_error():
    model = hf.patch_model(build("qwen3_moe"), lora_rank=2)
    with pytest.raises(ValueError, match="patched already"):
        hf.patch_model(model)


def test_patch_without_lora_trains_router():
    """lora_rank=None: frozen experts; a router that requires grad gets the routing-weight gradient."""
    base = build("qwen3_moe")
    model = hf.patch_model(copy.deepcopy(base), lora_rank=None)
    ids = batch()
    router = model.model.layers[0].mlp.gate.weight
    router.requires_grad_(True)
    model(ids, labels=ids).loss.backward()
    twin = copy.deepcopy(base)
    twin.requires_grad_(False)
    twin.model.layers[0].mlp.gate.weight.requires_grad_(True)
    twin(ids, labels=ids).loss.backward()
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert rel_err(router.grad, twin.model.layers[0].mlp.gate.weight.grad) <= TOL


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_patch_frees_torch_expert_weights():
    """RSS after patching = RSS before - torch expert bytes + packed bytes (the torch copies are really freed)."""
    r = run_python_json("""
        import gc, json, os, torch
        from hf_models import build
        from kt_functional import hf
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        model = build("qwen3_moe", hidden_size=1024, moe_intermediate_size=512, num_experts=16)
        torch_bytes = sum(p.nbytes for n, p in model.named_parameters() if "experts" in n)
        gc.collect(); before = rss()
        hf.patch_model(model, lora_rank=None)
        gc.collect(); after = rss()
        packed = sum(kt.weights.nbytes for _, kt in hf.kt_layers(model))
        print(json.dumps(dict(torch_bytes=torch_bytes, packed=packed, before=before, after=after)))
    """)
    delta = r["after"] - r["before"]
    expected = r["packed"] - r["torch_bytes"]
    assert r["torch_bytes"] >= 180 * 2**20
    assert abs(delta - expected) <= 0.15 * r["torch_bytes"], r


def _fused_checkpoint(model, directory):
    """The v5 layout: model.state_dict() keys (fused gate_up_proj) in one safetensors file."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(directory, "model.safetensors"))
    model.config.save_pretrained(directory)


@pytest.mark.parametrize("layout", ["per_expert", "per_expert_sharded", "fused"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_load_experts_layouts(arch, layout, tmp_path):
    """Every checkpoint layout packs exactly what from_fused packs from the model's own tensors."""
    base = build(arch)
    if layout == "fused":
        _fused_checkpoint(base, tmp_path)
    else:
        base.save_pretrained(tmp_path, max_shard_size="100KB" if layout.endswith("sharded") else "5GB")
    if layout == "per_expert_sharded":
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    loaded = dict(hf.load_experts(tmp_path))
    experts = [m for n, m in base.named_modules() if n.endswith("mlp.experts")]
    assert sorted(loaded) == list(range(len(experts)))
    x = torch.randn(9, base.config.hidden_size)
    ids = torch.randint(0, experts[0].num_experts, (9, 2))
    w = torch.rand(9, 2)
    for layer, module in enumerate(experts):
        want = KTExperts(ExpertWeights.from_fused(module.gate_up_proj, module.down_proj), lora_rank=None)
        got = KTExperts(loaded[layer], lora_rank=None)
        assert torch.equal(got(x, ids, w), want(x, ids, w))


def test_load_experts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_dir"):
        list(hf.load_experts(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        list(hf.load_experts(tmp_path))
    from safetensors.torch import save_file
    save_file({"model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(4, 8, dtype=torch.bfloat16)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layer 0 lacks expert weights"):
        list(hf.load_experts(tmp_path))


def test_meta_experts_filled_from_checkpoint(tmp_path):
    """A model built with empty (meta) expert weights, patched with checkpoint=, equals the one patched from memory."""
    from transformers import AutoModelForCausalLM

    base = build("deepseek_v3")
    base.save_pretrained(tmp_path)
    cfg = tiny_config("deepseek_v3")
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(cfg)
    for name, t in [*base.named_parameters(), *base.named_buffers()]:  # everything but the routed experts
        if ".experts." not in name:
            module, _, attr = name.rpartition(".")
            sub = empty.get_submodule(module)
            table = sub._parameters if attr in sub._parameters else sub._buffers
            table[attr] = torch.nn.Parameter(t.detach().clone()) if table is sub._parameters else t.clone()
    assert empty.model.layers[1].mlp.experts.gate_up_proj.is_meta
    with pytest.raises(ValueError, match="meta.*checkpoint="):
        hf.patch_model(copy.deepcopy(empty), lora_rank=2)
    from_ckpt = hf.patch_model(empty.eval(), lora_rank=2, checkpoint=tmp_path)
    from_memory = hf.patch_model(copy.deepcopy(base), lora_rank=2)
    ids = batch()
    with torch.no_grad():
        assert torch.equal(from_ckpt(ids).logits, from_memory(ids).logits)


def test_load_experts_peak_rss(tmp_path):
    """Streaming a sharded checkpoint: peak RSS <= packed size + one layer (+ slack), never all experts as torch."""
    big = dict(hidden_size=512, moe_intermediate_size=512, num_experts=16, num_hidden_layers=8,
               intermediate_size=256)
    model = build("qwen3_moe", **big).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    layer_bytes = sum(p.nbytes for n, p in model.named_parameters() if "layers.0.mlp.experts" in n)
    all_bytes = 8 * layer_bytes
    del model
    r = run_python_json(f"""
        import json, os, torch
        from kt_functional import ExpertWeights, hf
        def status(field):  # VmHWM: this process's peak RSS (a fresh mm after exec, unlike ru_maxrss)
            line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
            return int(line.split()[1]) * 1024
        ExpertWeights.from_fused(torch.zeros(2, 8, 32), torch.zeros(2, 32, 4))  # pools, allocator, code pages
        base = status("VmRSS")
        layers = list(hf.load_experts({str(tmp_path)!r}))
        print(json.dumps(dict(base=base, end=status("VmRSS"), peak=status("VmHWM"),
                              packed=sum(w.nbytes for _, w in layers), n=len(layers))))
    """)
    assert r["n"] == 8
    kept = r["end"] - r["base"]  # the packed layers as resident memory (buffers are rounded to huge pages)
    assert kept <= 1.15 * r["packed"], (r, kept)
    # Beyond what it keeps, loading needed one layer at a time (all layers at once would be 8 x that).
    assert r["peak"] - r["base"] <= kept + layer_bytes + 16 * 2**20, (r, layer_bytes, all_bytes)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_adapter_loads_in_peft(arch, tmp_path):
    """save_adapter -> peft.PeftModel.from_pretrained on the unpatched model gives the patched model's logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = build(arch)
    base.save_pretrained(tmp_path / "base")
    model = _patched(base)
    hf.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_parameters"]
    unpatched = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(unpatched, tmp_path / "adapter").eval()
    ids = batch()
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    assert rel_err(ours, theirs) <= TOL
    with torch.no_grad(), peft_model.disable_adapter():
        without = peft_model(ids).logits
    assert rel_err(without, theirs) > 10 * rel_err(ours, theirs), "the adapter must change the logits"


def test_adapter_round_trip_and_peft_trained_adapter(tmp_path):
    """load_adapter restores exactly what save_adapter wrote, and loads an adapter PEFT itself made."""
    peft = pytest.importorskip("peft")
    base = build("qwen3_moe")
    model = _patched(base)
    hf.save_adapter(model, tmp_path / "ours")
    other = hf.patch_model(copy.deepcopy(base), lora_rank=2, lora_alpha=3)
    hf.load_adapter(other, tmp_path / "ours")
    ids = batch()
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)
    assert [kt.lora_rank for _, kt in hf.kt_layers(other)] == [4, 4]

    config = peft.LoraConfig(r=6, lora_alpha=12, target_modules=[],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             init_lora_weights=False)  # random B: a non-trivial adapter
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    hf.load_adapter(other, tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(other(ids).logits, peft_model(ids).logits) <= TOL
    with pytest.raises(FileNotFoundError, match="adapter_directory"):
        hf.load_adapter(other, tmp_path / "missing")


def test_save_adapter_needs_a_patched_model(tmp_path):
    with pytest.raises(ValueError, match="patch_model"):
        hf.save_adapter(build("qwen3_moe"), tmp_path)


def test_gradient_checkpointing_same_grads_cache_not_kept():
    base = build("qwen3_moe")
    ids = batch()
    plain = _patched(base)
    plain.train()
    loss = plain(ids, labels=ids).loss
    count, nbytes = live_residuals()
    assert count == 2 and nbytes > 0  # one expert cache per layer, alive until the backward
    loss.backward()
    ref = lora_grads(plain)
    assert live_residuals() == (0, 0)

    ckpt = _patched(base)
    ckpt.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss2 = ckpt(ids, labels=ids).loss
    assert live_residuals() == (0, 0)  # the checkpointed forward keeps no expert cache
    loss2.backward()
    assert live_residuals() == (0, 0)
    assert torch.equal(loss, loss2)
    for key, g in lora_grads(ckpt).items():
        assert torch.equal(g, ref[key]), key


def test_gradient_accumulation_matches_one_batch():
    base = build("mixtral")
    ids = batch(batch_size=4)
    one = _patched(base)
    (one(ids, labels=ids).loss).backward()
    accum = _patched(base)
    for part in ids.split(2):
        (accum(part, labels=part).loss / 2).backward()  # equal-length micro-batches: mean of means
    ref = lora_grads(one)
    for key, g in lora_grads(accum).items():
        assert rel_err(g, ref[key]) <= TOL, key


def test_fallback_replaces_modules_without_experts_interface(monkeypatch):
    """Where transformers has no experts interface, the experts modules themselves become KTExperts."""
    monkeypatch.setattr(hf, "_has_experts_interface", lambda: False)
    base = build("olmoe")
    model = _patched(base)
    assert all(isinstance(model.get_submodule(path), KTExperts) for path, _ in hf.kt_layers(model))
    twin = torch_twin(base, model)
    ids = batch()
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(twin, ids)
    assert abs(loss - ref_loss) / ref_loss <= TOL
    for key, g in grads.items():
        assert rel_err(g, ref_grads[key]) <= TOL, key
