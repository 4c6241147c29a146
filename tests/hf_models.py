"""Tiny transformers MoE models built from configs with random weights, and a plain-torch LoRA twin."""
from __future__ import annotations

import torch

from kt_functional import hf
from kt_functional.reference import LORA_KEYS

_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
_LINEAR_ATTN = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                    linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"])

TINY_CONFIGS = {
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=40, num_experts=8,
                      num_experts_per_tok=2, num_hidden_layers=2, **_ATTN),
    "qwen3_next": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=40,
                       shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                       num_hidden_layers=2, **_ATTN, **_LINEAR_ATTN),
    "qwen3_5_moe_text": dict(hidden_size=64, moe_intermediate_size=40, shared_expert_intermediate_size=48,
                             num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, **_ATTN, **_LINEAR_ATTN),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=40,
                      shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "mixtral": dict(hidden_size=64, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2,
                    num_hidden_layers=2, **_ATTN),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=40, n_routed_experts=16,
                        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                        first_k_dense_replace=1, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, vocab_size=256, routed_scaling_factor=2.5),
    "olmoe": dict(hidden_size=64, intermediate_size=40, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=256, eos_token_id=1, pad_token_id=0),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def build(model_type: str, seed: int = 0, **overrides):
    """A tiny fp32 model in eval mode; expert weights rounded to bf16 (what the kernels hold), non-zero router bias."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(p.bfloat16().float())
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: exercise the biased group routing
                b.copy_(torch.randn_like(b) * 0.1)
    return model.eval()


def randomize_lora_b(model, std: float = 0.05, seed: int = 1) -> None:
    """PEFT initialises B = 0; tests give B values so every LoRA gradient is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, kt in hf.kt_layers(model):
            for name in ("gate_b", "up_b", "down_b"):
                p = getattr(kt, name)
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def torch_twin(base, patched):
    """The unpatched base carrying patched's LoRA in plain fp32 torch (per-expert loop)."""
    return hf.torch_lora_twin(base, patched, impl="eager")


def lora_grads(model) -> dict[str, torch.Tensor]:
    """path.name -> grad of every LoRA tensor, for a patched model or its torch twin."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "gate_a") and hasattr(module, "down_b"):
            path = name.removesuffix(".kt_experts")
            for key in LORA_KEYS:
                out[f"{path}.{key}"] = getattr(module, key).grad
    return out


def batch(seed: int = 0, batch_size: int = 2, seq: int = 24):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, seq), generator=gen)
