"""kt_functional.hf with quantized experts: checkpoints in their own formats (DeepSeek-V3's block-FP8,
compressed-tensors' pack-quantized int4, gpt-oss' mxfp4) read per config.json's quantization_config,
one layer at a time without a bf16 copy; patch_model(storage=) quantizing a bf16 model's experts."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from helpers import TOL, rel_err, run_python_json
from hf_models import batch, build, lora_grads, randomize_lora_b, tiny_config, torch_twin

from kt_functional import ExpertWeights, hf, quant

QUANTIZATION_CONFIG = {
    "fp8_block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128]},
    "int4_group": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                   "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                       "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}},
    "mxfp4": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]},
}


def quantized_checkpoint(model, directory, storage, max_shard_size=None):
    """model's checkpoint with its routed experts as `storage`'s models ship them: per-expert keys for fp8
    (weight + weight_scale_inv) and int4 (weight_packed, weight_scale, weight_shape), fused *_blocks / *_scales
    for mxfp4; everything else as saved by transformers."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = t.contiguous()
            continue
        prefix, proj = name.rsplit(".", 1)
        codes, scales = quant.quantize(storage, t)
        if storage == "mxfp4":
            tensors[f"{prefix}.{proj}_blocks"], tensors[f"{prefix}.{proj}_scales"] = codes, scales
            continue
        I = t.shape[1] // 2
        parts = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I)} if proj == "gate_up_proj" else \
            {"down_proj": slice(None)}
        for e in range(t.shape[0]):
            for sub, rows in parts.items():
                key = f"{prefix}.{e}.{sub}"
                if storage == "fp8_block":  # gate rows [0, I) are whole 128-blocks only if I % 128 == 0
                    c, s = quant.quantize("fp8_block", t[e : e + 1, rows])
                    tensors[f"{key}.weight"], tensors[f"{key}.weight_scale_inv"] = c[0], s[0]
                else:
                    c, s = quant.quantize("int4_group", t[e : e + 1, rows])
                    tensors[f"{key}.weight_packed"], tensors[f"{key}.weight_scale"] = c[0], s[0]
                    tensors[f"{key}.weight_shape"] = torch.tensor(t[e, rows].shape)
    if max_shard_size is None:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
    else:  # one file per layer, with an index
        shards, index = {}, {}
        for key, t in tensors.items():
            layer = key.split("layers.")[1].split(".")[0] if "layers." in key else "rest"
            file = f"model-{layer}.safetensors"
            shards.setdefault(file, {})[key] = t
            index[key] = file
        for file, part in shards.items():
            save_file(part, os.path.join(directory, file))
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": index}, f)
    config = model.config.to_dict()
    config["quantization_config"] = QUANTIZATION_CONFIG[storage]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


def meta_model(base, arch="qwen3_moe"):
    """base's architecture with empty (meta) routed experts and base's other weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(tiny_config(arch))
    for name, t in [*base.named_parameters(), *base.named_buffers()]:
        if ".experts." not in name:
            module, _, attr = name.rpartition(".")
            sub = empty.get_submodule(module)
            table = sub._parameters if attr in sub._parameters else sub._buffers
            table[attr] = torch.nn.Parameter(t.detach().clone()) if table is sub._parameters else t.clone()
    return empty.eval()


@pytest.mark.parametrize("storage", ["fp8_block", "int4_group", "mxfp4"])
def test_quantized_checkpoint_packs_its_own_format(storage, tmp_path):
    """load_experts and patch_model(checkpoint=) keep the checkpoint's codes: the same logits as quantizing the
    bf16 model's experts at patch time with the same quantizer (storage=)."""
    base = build("qwen3_moe")
    quantized_checkpoint(base, tmp_path, storage)
    assert hf.checkpoint_storage(tmp_path) == storage
    layers = dict(hf.load_experts(tmp_path))
    assert sorted(layers) == [0, 1] and all(w.storage == storage for w in layers.values())
    from_ckpt = hf.patch_model(meta_model(base), lora_rank=2, checkpoint=tmp_path)
    at_patch = hf.patch_model(copy.deepcopy(base), lora_rank=2, storage=storage)
    for (_, a), (_, b) in zip(hf.kt_layers(from_ckpt), hf.kt_layers(at_patch)):
        assert a.weights.storage == b.weights.storage == storage
        for x, y in zip(a.weights.dequantize(), b.weights.dequantize()):
            assert torch.equal(x, y)
    ids = batch()
    with torch.no_grad():
        assert torch.equal(from_ckpt(ids).logits, at_patch(ids).logits)
    with pytest.raises(ValueError, match="storage"):
        list(hf.load_experts(tmp_path, storage="int8"))


@pytest.mark.parametrize("storage", ["int8", "int4_group"])
def test_patch_model_storage_trains_like_torch_on_the_dequantized_weights(storage):
    """patch_model(storage=) on a bf16 model: loss and LoRA gradients match a torch twin whose experts are
    the dequantize()'d weights (MATH.md tolerances)."""
    base = build("qwen3_moe")
    model = hf.patch_model(copy.deepcopy(base), lora_rank=4, lora_alpha=8, storage=storage)
    randomize_lora_b(model)
    dequantized = copy.deepcopy(base)
    for path, kt in hf.kt_layers(model):
        assert kt.weights.storage == storage
        gate, up, down = kt.weights.dequantize()
        experts = dequantized.get_submodule(path)
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
            experts.down_proj.copy_(down)
    twin = torch_twin(dequantized, model)
    ids = batch()
    losses = []
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append((loss.detach(), lora_grads(m)))
    (loss, grads), (ref_loss, ref_grads) = losses
    assert abs(loss - ref_loss) / ref_loss <= TOL
    for key, g in grads.items():
        assert rel_err(g, ref_grads[key]) <= TOL, key


def test_checkpoint_quantization_config_errors(tmp_path):
    base = build("qwen3_moe")
    quantized_checkpoint(base, tmp_path, "fp8_block")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["quantization_config"]["weight_block_size"] = [64, 64]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="weight_block_size"):
        list(hf.load_experts(tmp_path))
    config["quantization_config"] = {"quant_method": "awq"}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="awq"):
        list(hf.load_experts(tmp_path))
    with pytest.raises(ValueError, match="storage"):
        hf.patch_model(copy.deepcopy(base), storage="int5")


@pytest.mark.parametrize("storage", ["fp8_block", "int4_group"])
def test_quantized_checkpoint_peak_rss(storage, tmp_path):
    """Streaming a quantized checkpoint: peak RSS <= packed size + one quantized layer (+ slack), less than a
    bf16 copy of one layer would add."""
    big = dict(hidden_size=1024, moe_intermediate_size=512, num_experts=16, num_hidden_layers=4,
               intermediate_size=256)
    model = build("qwen3_moe", **big).to(torch.bfloat16)
    quantized_checkpoint(model, tmp_path, storage, max_shard_size="layer")
    bf16_layer = sum(p.nbytes for n, p in model.named_parameters() if "layers.0.mlp.experts" in n)
    del model
    r = run_python_json(f"""
        import json, torch
        from kt_functional import ExpertWeights, hf
        def status(field):  # VmHWM: this process's peak RSS
            line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
            return int(line.split()[1]) * 1024
        ExpertWeights.from_tensors(torch.zeros(2, 64, 64), torch.zeros(2, 64, 64), torch.zeros(2, 64, 64),
                                   storage={storage!r})  # pools, allocator, code pages
        base = status("VmRSS")
        layers = list(hf.load_experts({str(tmp_path)!r}))
        print(json.dumps(dict(base=base, end=status("VmRSS"), peak=status("VmHWM"),
                              packed=sum(w.nbytes for _, w in layers), n=len(layers),
                              storage=layers[0][1].storage)))
    """)
    assert r["n"] == 4 and r["storage"] == storage
    kept = r["end"] - r["base"]
    assert kept <= 1.15 * r["packed"], r
    layer = r["packed"] / 4  # one quantized layer as the checkpoint holds it (within 3%)
    transient = r["peak"] - r["base"] - kept
    assert transient <= 1.1 * layer + 8 * 2**20, (r, layer, bf16_layer)
    assert transient < bf16_layer, (r, bf16_layer)


def test_gpt_oss_mxfp4_rows_interleaved(tmp_path):
    """gpt-oss stores gate_up_proj_blocks with gate and up rows alternating: load_experts splits them so."""
    from safetensors.torch import save_file

    E, H, I = 4, 64, 40
    gen = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(E, o, i, generator=gen) * 0.1 for o, i in ((I, H), (I, H), (H, I)))
    interleaved = torch.stack([gate, up], dim=2).reshape(E, 2 * I, H)  # rows g0, u0, g1, u1, ...
    tensors = {}
    for name, w in (("gate_up_proj", interleaved), ("down_proj", down)):
        blocks, scales = quant.quantize("mxfp4", w)
        tensors[f"model.layers.0.mlp.experts.{name}_blocks"] = blocks
        tensors[f"model.layers.0.mlp.experts.{name}_scales"] = scales
    save_file(tensors, tmp_path / "model.safetensors")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gpt_oss", "quantization_config": QUANTIZATION_CONFIG["mxfp4"]}, f)
    (layer, weights), = hf.load_experts(tmp_path)
    expected = ExpertWeights.from_tensors(gate, up, down, storage="mxfp4")
    assert layer == 0 and weights.storage == "mxfp4"
    for a, b in zip(weights.dequantize(), expected.dequantize()):
        assert torch.equal(a, b)
