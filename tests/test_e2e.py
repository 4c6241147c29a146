"""End to end: patch a tiny model, 20 AdamW steps on a fixed batch. Every step's loss matches the
unpatched model carrying the same LoRA in plain fp32 torch within 1% relative; the LoRA gradients
of step 1 match within MATH.md's tolerance."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from helpers import TOL, rel_err  # noqa: E402
from hf_models import batch, build, lora_grads, randomize_lora_b, torch_twin  # noqa: E402

from kt_functional import hf  # noqa: E402

STEPS = 20


def _train(model, ids, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    losses, first_grads = [], None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        if step == 0:
            first_grads = {k: g.clone() for k, g in lora_grads(model).items()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


@pytest.mark.parametrize("arch,layers,experts,hidden", [
    ("qwen3_moe", 2, 16, 128),
    ("mixtral", 2, 8, 64),
    ("deepseek_v3", 3, 16, 96),
])
def test_twenty_adamw_steps_match_torch(arch, layers, experts, hidden):
    expert_key = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}.get(arch, "num_experts")
    base = build(arch, num_hidden_layers=layers, hidden_size=hidden, **{expert_key: experts})
    model = hf.patch_model(copy.deepcopy(base), lora_rank=8, lora_alpha=16)
    randomize_lora_b(model, std=0.02)
    twin = torch_twin(base, model)
    model.train()
    twin.train()
    ids = batch(batch_size=2, seq=32)

    losses, grads = _train(model, ids, STEPS)
    ref_losses, ref_grads = _train(twin, ids, STEPS)

    for step, (ours, ref) in enumerate(zip(losses, ref_losses)):
        assert abs(ours - ref) / abs(ref) <= 0.01, (step, losses, ref_losses)
    assert ref_losses[-1] < 0.9 * ref_losses[0], "the fine-tuning must make progress"
    assert grads.keys() == ref_grads.keys() and len(grads) == 6 * len(hf.kt_layers(model))
    for key, g in grads.items():
        assert rel_err(g, ref_grads[key]) <= TOL, key


def test_quantized_experts_train_like_bf16():
    """The same fine-tuning with the frozen experts stored as int8 and int4_group: the loss falls as with bf16
    experts (final loss within 5% of bf16's)."""
    base = build("qwen3_moe", num_hidden_layers=2, hidden_size=128, num_experts=16)
    ids = batch(batch_size=2, seq=32)
    final = {}
    for storage in ("bf16", "int8", "int4_group"):
        model = hf.patch_model(copy.deepcopy(base), lora_rank=8, lora_alpha=16, storage=storage)
        assert all(kt.weights.storage == storage for _, kt in hf.kt_layers(model))
        randomize_lora_b(model, std=0.02)
        model.train()
        losses, _ = _train(model, ids, STEPS)
        assert losses[-1] < 0.9 * losses[0], (storage, losses)
        final[storage] = losses[-1]
    print(f"final loss after {STEPS} steps by storage: {final}")
    for storage in ("int8", "int4_group"):
        assert abs(final[storage] - final["bf16"]) <= 0.05 * final["bf16"], final


def test_demo_runs_with_quantized_experts(tmp_path, capsys):
    from kt_functional.__main__ import main

    rc = main(["--storage", "int4_group", "--steps", "16", "--layers", "1", "--experts", "4", "--top-k", "2",
               "--hidden", "64", "--intermediate", "48", "--batch", "2", "--seq", "32", "--rank", "4",
               "--peer-steps", "1", "--threads", "2", "--out", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert "as int4_group" in out and "logits identical" in out, out
    assert rc == 0, out
