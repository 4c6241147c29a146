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
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=8, mamba_d_head=16,
                             mamba_d_state=16, mamba_chunk_size=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[32, 32], rope_parameters={
        "rope_theta": 500000.0, "rope_type": "default", "mrope_section": [3, 3, 2]}),
    "bailing_hybrid": dict(num_experts_per_token=2, num_expert_group=1, topk_group=1),
    "diffusion_gemma": dict(top_k_experts=2, enable_moe_block=True, vocab_size_per_layer_input=256,
                            hidden_size_per_layer_input=16),
    "gemma4": dict(top_k_experts=2, enable_moe_block=True, vocab_size_per_layer_input=256,
                   hidden_size_per_layer_input=16),
    "glm4v_moe": dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default",
                                       "mrope_section": [2, 1, 1]}),
    "deepseek_ocr2": dict(mlp_layer_types=["dense", "sparse"]),
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                      indexer_compress_ratio=4, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_num_key_heads=2, linear_num_value_heads=4, hc_lowrank=16, ple_embed_dim=16,
                      ngram_vocab_size_base=256),
}
# Families whose config derives per-layer configurations in its constructor: built from these arguments.
CONSTRUCTED = {
    "dots3_note": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, head_dim=24,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=1,
                       topk_group=1, num_experts_per_tok=2, n_shared_experts=1, vocab_size=256,
                       first_k_dense_replace=1, use_sliding_window=False, use_dsa=False,
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
# Fields a family's config class lacks but its model reads (added, not only overridden).
FAMILY_ADDED = {
    "qwen3_omni_moe": dict(shared_expert_intermediate_size=32),
}


# Models whose forward takes embeddings (their embedding table is a different one: a talker's codec).
EMBEDDINGS_INPUT = {"Qwen3OmniMoeTalkerModel"}


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
        if key in vars(cfg):
            _set(cfg, key, value)
    if "hidden_size" in vars(cfg):
        for key, value in FAMILY_ADDED.get(family, {}).items():
            setattr(cfg, key, value)
    if "allow_global_per_layer_attribute_access" in vars(cfg) or hasattr(type(cfg), "per_layer_config"):
        cfg.allow_global_per_layer_attribute_access = True  # one config for every layer of a tiny model
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
    if family in CONSTRUCTED:
        return cls.config_class(**CONSTRUCTED[family])
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
                model = _construct(cls, cfg)
        except Exception as e:  # noqa: BLE001 - reported with the class that failed
            reasons.append(f"{cls.__name__}: {type(e).__name__}: {str(e)[:160]}")
            continue
        experts = [m for m in model.modules() if isinstance(m, experts_cls)]
        if not experts:
            reasons.append(f"{cls.__name__}: no {experts_name}")
            continue
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for t in [*model.parameters(), *model.buffers()]:  # left uninitialized (NaN, see _construct)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
            for m in experts:
                for name, p in m.named_parameters(recurse=False):
                    if name.endswith("_bias"):
                        p.copy_(torch.randn_like(p) * 0.1)
                    elif p.dim() == 3:
                        p.copy_(p.bfloat16().float())
        return model, cls
    raise RuntimeError("; ".join(reasons))


def _construct(cls, cfg):
    """cls(cfg) in eval mode, built with torch.empty's memory filled with NaN: some classes leave tensors
    uninitialized (Qwen3-Omni's talker its experts weights), which otherwise held whatever the process's
    memory did, finite or not, so the model (and the test's verdict) changed with the tests run before."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        return cls(cfg).eval()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _experts_modules(model) -> list:
    from kt_functional import hf

    paths = {path for path, _ in hf.kt_layers(model)}
    return [m for n, m in model.named_modules() if n in paths or type(m).__name__ == "_TorchTwinExperts"]


def run(model, ids: torch.Tensor, routes: list | None = None, seed: int = 0):
    """(output, d loss / d input embeddings, routes, calls) of a fixed random linear loss on the model's last
    output; calls: (experts module, hidden_states, top_k_index, top_k_weights) of each experts call.

    routes: the top-k expert ids each experts call received, recorded (None) or replayed from another run:
    top-k selection is discontinuous, so near-ties that bf16 operands flip would make two correct models
    differ wherever they route differently; replaying the patched run's decisions in the twin compares the
    same routing (the routing weights stay each model's own and differentiable)."""
    grads, recorded, calls = [], [], []
    replay = iter(routes) if routes is not None else None

    def keep_grad(module, args, out):  # a leaf of its own: the embedding weights may be frozen
        leaf = out.detach().requires_grad_(True)
        grads.append(leaf)
        return leaf

    def route(module, args, kwargs):
        args = list(args)
        if replay is not None:
            args[1] = next(replay)
        recorded.append(args[1].detach().clone())
        calls.append((module, *(a.detach() for a in args[:3])))
        return tuple(args), kwargs

    embeddings = None if type(model).__name__ in EMBEDDINGS_INPUT else model.get_input_embeddings()
    inputs = dict(input_ids=ids)
    handles = [m.register_forward_pre_hook(route, with_kwargs=True) for m in _experts_modules(model)]
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(keep_grad))
    else:  # random embeddings, the same for every model
        gen = torch.Generator().manual_seed(int(ids.sum()))
        grads.append(torch.randn(*ids.shape, model.config.hidden_size, generator=gen).requires_grad_(True))
        inputs = dict(inputs_embeds=grads[0])
    try:
        out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    gen = torch.Generator().manual_seed(seed)
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    assert recorded, "no experts module ran"
    return y.detach(), grads[0].grad, recorded, calls


def layer_errors(patched_calls, twin_calls, seed: int = 0) -> list[tuple[float, float, float]]:
    """(rel. error of y, of dx, of the routing weights' gradient dw) of each patched experts call against the
    twin's module on the same inputs."""
    out = []
    gen = torch.Generator().manual_seed(seed)
    for (module, x, ids, w), (twin, *_) in zip(patched_calls, twin_calls):
        gy = torch.randn(x.shape, generator=gen)
        results = []
        for m in (module, twin):
            xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            y = m(xl, ids, wl)
            (y * gy.to(y.dtype)).sum().backward()
            results.append((y.detach(), xl.grad, wl.grad))
        (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
        out.append((_rel(y, y_ref), _rel(dx, dx_ref), _rel(dw, dw_ref)))
    return out


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
