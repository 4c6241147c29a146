"""Every experts class the installed transformers registers with its experts interface, and a tiny model
containing it built from the model's own config class (sizes shrunk, random weights, no downloads)."""
from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
import warnings

import torch

SIZES = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts_per_tok=2, max_position_embeddings=256,
             shared_expert_intermediate_size=32, shared_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
             first_k_dense_replace=0, num_experts=8, num_local_experts=8, n_routed_experts=8, n_shared_experts=1,
             moe_num_experts=8, moe_k=2, moe_topk=2)
TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")
MAX_PARAMETERS = 30e6

# Config fields a family needs beyond the generic shrinking (its own config class's names).
FAMILY = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False, mamba_dt_rank=8),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                             mamba_chunk_size=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[32, 32]),
}


def experts_classes() -> list[tuple[str, str, str]]:
    """(model directory, modeling module, experts class) for every class decorated with
    @use_experts_implementation in transformers/models/*/modeling_*.py."""
    import transformers

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    out = []
    for d in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, d)):
            continue
        for f in sorted(os.listdir(os.path.join(root, d))):
            if not (f.startswith("modeling_") and f.endswith(".py")):
                continue
            src = open(os.path.join(root, d, f)).read()
            if "use_experts_implementation" not in src:
                continue
            for node in ast.parse(src).body:
                if isinstance(node, ast.ClassDef) and any("use_experts_implementation" in ast.unparse(x)
                                                          for x in node.decorator_list):
                    out.append((d, f[:-3], node.name))
    return out


def _set(cfg, key, value) -> None:
    try:
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    except Exception:  # a per-layer attribute: read-only globally
        pass


def _layer_subset(cfg, n: int) -> list[int]:
    """Layer indices (at least 2) covering every distinct value of every per-layer list of the config."""
    lists = [v for v in vars(cfg).values() if isinstance(v, list) and len(v) == n]
    keep, seen = [], set()
    for i in range(n):
        new = {(j, repr(values[i])) for j, values in enumerate(lists)} - seen
        if new or len(keep) < 2:
            keep.append(i)
            seen |= new
    return keep


def shrink(cfg, family: str):
    for key, value in SIZES.items():
        if key in vars(cfg) and not isinstance(vars(cfg)[key], (list, dict)):
            _set(cfg, key, value)
    rope = vars(cfg).get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", vars(cfg).get("partial_rotary_factor")) or 1.0
    if vars(cfg).get("qk_rope_head_dim"):  # MLA: rope on qk_rope_head_dim; as many kv heads as heads
        _set(cfg, "head_dim", int(cfg.qk_rope_head_dim / partial))
        _set(cfg, "num_key_value_heads", cfg.num_attention_heads)
    n = vars(cfg).get("num_hidden_layers")
    if isinstance(n, int):
        keep = _layer_subset(cfg, n)
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == n and len(keep) != n:
                _set(cfg, key, [value[i] for i in keep])
        _set(cfg, "num_hidden_layers", len(keep))
    for key, value in FAMILY.get(family, {}).items():
        _set(cfg, key, value)
    if isinstance(rope, dict) and rope.get("mrope_section"):  # multimodal rope sections over the rotary half
        head_dim = vars(cfg).get("head_dim") or cfg.hidden_size // cfg.num_attention_heads
        half, sections = int(head_dim * partial) // 2, rope["mrope_section"]
        new = [max(1, s * half // sum(sections)) for s in sections]
        new[0] += half - sum(new)
        rope["mrope_section"] = new
    for key in TOKENS:
        if isinstance(vars(cfg).get(key), int) and cfg.vocab_size and vars(cfg)[key] >= cfg.vocab_size:
            _set(cfg, key, 1)
    return cfg


def _model_classes(module):
    from transformers import PreTrainedModel

    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, PreTrainedModel) and c.__module__ == module.__name__
               and getattr(c, "config_class", None) is not None]

    def rank(c):
        n = c.__name__
        return (0 if n.endswith("ForCausalLM") else 1 if n.endswith("TextModel") else 2 if n.endswith("Model") else 3,
                n)

    return sorted(classes, key=rank)


def _config(cls, family: str):
    cfg = shrink(cls.config_class(), family)
    for sub in ("text_config", "talker_config", "thinker_config"):
        if isinstance(vars(cfg).get(sub), object) and hasattr(vars(cfg).get(sub), "to_dict"):
            shrink(vars(cfg)[sub], family)
    return cfg


def build(family: str, module_name: str, experts_name: str, seed: int = 0):
    """(model, its class): the first model class of the modeling module (causal LM first) that builds from its
    shrunk config and contains the experts class; fp32, eval mode; expert weights rounded to bf16 (what the
    kernels hold), biases non-zero. RuntimeError with each candidate's reason otherwise."""
    module = importlib.import_module(f"transformers.models.{family}.{module_name}")
    experts_cls = getattr(module, experts_name)
    reasons = []
    for cls in _model_classes(module):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = _config(cls, family)
                with torch.device("meta"):
                    n = sum(p.numel() for p in cls(cfg).parameters())
                if n > MAX_PARAMETERS:
                    reasons.append(f"{cls.__name__}: {n / 1e6:.0f}M parameters")
                    continue
                torch.manual_seed(seed)
                model = cls(cfg).eval()
        except Exception as e:  # noqa: BLE001 - reported with the class that failed
            reasons.append(f"{cls.__name__}: {type(e).__name__}: {str(e)[:160]}")
            continue
        experts = [m for m in model.modules() if isinstance(m, experts_cls)]
        if not experts:
            reasons.append(f"{cls.__name__}: no {experts_name}")
            continue
        with torch.no_grad():
            for m in experts:
                for name, p in m.named_parameters(recurse=False):
                    if name.endswith("_bias"):
                        p.copy_(torch.randn_like(p) * 0.1)
                    elif p.dim() == 3:
                        p.copy_(p.bfloat16().float())
        return model, cls
    raise RuntimeError("; ".join(reasons))


def run(model, ids: torch.Tensor, seed: int = 0):
    """(output, d loss / d input embeddings) of a fixed random linear loss on the model's last output."""
    grads = []

    def keep_grad(module, args, out):  # a leaf of its own: the embedding weights may be frozen
        leaf = out.detach().requires_grad_(True)
        grads.append(leaf)
        return leaf

    handle = model.get_input_embeddings().register_forward_hook(keep_grad)
    try:
        out = model(input_ids=ids)
    finally:
        handle.remove()
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    gen = torch.Generator().manual_seed(seed)
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    return y.detach(), grads[0].grad
