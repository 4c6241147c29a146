"""A whole LoRA training step of a small Qwen3-MoE (the main job's model): kt-functional's patched
model vs the unpatched torch model carrying the same LoRA (transformers' grouped_mm experts layout),
measured in the same run. ``KT_BENCH_SMOKE=1`` shrinks the model."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from conftest import SMOKE  # noqa: E402

from kt_functional import hf  # noqa: E402
from kt_functional.__main__ import _optimizer, _step  # noqa: E402

MODEL = dict(layers=1, experts=8, hidden=128, intermediate=64, seq=32) if SMOKE else \
    dict(layers=4, experts=32, hidden=1024, intermediate=384, seq=256)
BATCH = 4


@pytest.fixture(scope="module")
def models():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    m = MODEL
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=256, hidden_size=m["hidden"], intermediate_size=2 * m["hidden"],
        moe_intermediate_size=m["intermediate"], num_experts=m["experts"], num_experts_per_tok=4,
        num_hidden_layers=m["layers"], num_attention_heads=8, num_key_value_heads=4, head_dim=m["hidden"] // 8,
        tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
    patched = hf.patch_model(copy.deepcopy(base), lora_rank=16, lora_alpha=32)
    return {"kt": patched, "torch_grouped_mm": hf.torch_lora_twin(base, patched, impl="grouped_mm")}


@pytest.mark.parametrize("impl", ["kt", "torch_grouped_mm"])
def test_train_step(benchmark, models, impl):
    model = models[impl]
    opt = _optimizer(model, 1e-4)
    ids = torch.randint(0, 256, (BATCH, MODEL["seq"]), generator=torch.Generator().manual_seed(0))
    benchmark.group = f"train step qwen3-moe L={MODEL['layers']} E={MODEL['experts']} T={BATCH * MODEL['seq']}"
    benchmark.extra_info["tokens"] = BATCH * MODEL["seq"]
    benchmark.pedantic(_step, args=(model, opt, ids), rounds=5, warmup_rounds=1, iterations=1)
