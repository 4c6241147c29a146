"""Float32 torch reference of the MoE expert layer, written literally from MATH.md.

This module is independent of the compiled parts of ``kt_functional``: it imports only
``torch`` (and numpy lazily, to accept numpy inputs), so it can be imported standalone by
path (``importlib``) before the library builds.

Contents
--------
- :func:`moe_reference`        float32 forward of MATH.md (loop over experts).
- :func:`moe_reference_grads`  gradients of the reference by torch autograd.
- :func:`moe_reference_pairs`  per routed pair: ``h`` and ``dh_raw`` of MATH.md's backward.
- :func:`dw_magnitude`         ``m[t, j] = sum_i |dh_raw[i]| |h[i]|``, the scale of dw's error bound.
- :func:`rel_err`              ``||out - ref|| / ||ref||`` (MATH.md's tolerance measure).
- :func:`dw_err`               ``||dw - ref|| / ||m||`` (MATH.md's measure for dw).
- :func:`make_problem`         random test inputs with realistic scales.
- :func:`eager_loop_moe`       peer: bf16 per-expert python loop (transformers "eager" experts).
- :func:`grouped_mm_moe`       peer: bf16 ``torch._grouped_mm`` over expert-sorted routes
                               (transformers "grouped_mm" experts).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import torch
import torch.nn.functional as F

__all__ = [
    "LORA_KEYS",
    "moe_reference",
    "moe_reference_grads",
    "moe_reference_pairs",
    "dw_magnitude",
    "rel_err",
    "dw_err",
    "make_problem",
    "eager_loop_moe",
    "grouped_mm_moe",
    "HAS_GROUPED_MM",
    "dequantize_checkpoint",
]

LORA_KEYS = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")

#: True when this torch exposes ``torch._grouped_mm`` (it does on CPU in torch 2.13).
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


# ----------------------------------------------------------------------------- helpers
def _as_tensor(a):
    """torch tensor view of ``a`` (numpy arrays are wrapped without copy)."""
    if isinstance(a, torch.Tensor):
        return a
    return torch.as_tensor(a)


def _f32(a):
    """Upcast to float32, keeping the autograd graph (no detach)."""
    return _as_tensor(a).to(torch.float32)


def _lora_get(lora, name):
    if isinstance(lora, Mapping):
        return lora[name]
    return getattr(lora, name)


def _lora_scale(lora, scale):
    if scale is not None:
        return float(scale)
    if isinstance(lora, Mapping):
        if "scale" in lora:
            return float(lora["scale"])
    elif getattr(lora, "scale", None) is not None:
        return float(lora.scale)
    raise ValueError("scale (alpha / r) is required when lora is given")


def _check_ids(ids, E):
    ids = _as_tensor(ids).to(torch.int64)
    if ids.numel() and int(ids.min()) < -1:
        raise ValueError(f"ids must be >= -1; got minimum {int(ids.min())}")
    return ids  # ids >= E are expert-parallel sentinels: no expert loop below matches them


# MATH.md "Activations and derivatives", literally (autograd differentiates them).
_SQRT_2_OVER_PI = (2.0 / torch.pi) ** 0.5
_ACTIVATIONS = {
    "silu": lambda z, a: z * torch.sigmoid(z),
    "swish": lambda z, a: z * torch.sigmoid(a * z),
    "quick_gelu": lambda z, a: z * torch.sigmoid(1.702 * z),
    "gelu": lambda z, a: z * 0.5 * (1.0 + torch.erf(z / 2.0 ** 0.5)),
    "gelu_tanh": lambda z, a: 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z ** 3))),
    "relu": lambda z, a: torch.clamp(z, min=0.0),
    "relu2": lambda z, a: torch.clamp(z, min=0.0) ** 2,
}


def _hidden(g, u, variant):
    """h of MATH.md's "Expert variants" table: gated act(min(g, L)) * (clamp(u, -L, L) + offset), or act(u)."""
    if variant is None:
        return g * torch.sigmoid(g) * u
    if callable(variant):  # a gate function of its own (the split path's)
        return variant(g, u)
    act = _ACTIVATIONS[variant.activation]
    alpha = getattr(variant, "alpha", None)
    if not variant.gated:
        return act(u, alpha)
    limit = getattr(variant, "limit", None)
    if limit is not None:
        g = torch.clamp(g, max=limit)
        u = torch.clamp(u, min=-limit, max=limit)
    return act(g, alpha) * (u + getattr(variant, "up_offset", 0.0))


# ----------------------------------------------------------------------------- reference
def moe_reference(x, ids, w, gate, up, down, lora=None, scale=None, variant=None, biases=None):
    """float32 forward of MATH.md.

    x [T,H], ids [T,k] (-1 = unused slot, >= E = sentinel, both skipped), w [T,k], gate/up [E,I,H],
    down [E,H,I] (gate unused when not gated); lora: mapping or object with gate_a [E,r,H], gate_b [E,I,r],
    up_a [E,r,H], up_b [E,I,r], down_a [E,r,I], down_b [E,H,r]; scale = alpha / r.  variant: None
    (SwiGLU), an object with gated, activation, alpha, limit, up_offset (MATH.md "Expert variants") or a
    function (g, u) -> h;
    biases: None or a mapping with any of "gate" [E,I], "up" [E,I], "down" [E,H].  Every input is
    upcast to float32 (differentiably, so autograd can flow to float32 leaves).  Returns y [T,H] float32.
    """
    biases = {k: _f32(v) for k, v in (biases or {}).items() if v is not None}
    x = _f32(x)
    w = _f32(w)
    gate, up, down = _as_tensor(gate), _as_tensor(up), _as_tensor(down)
    E = gate.shape[0]
    T, H = x.shape
    ids = _check_ids(ids, E)
    if lora is not None:
        s = _lora_scale(lora, scale)
        Ag, Bg, Au, Bu, Ad, Bd = (_f32(_lora_get(lora, n)) for n in LORA_KEYS)

    y = torch.zeros(T, H, dtype=torch.float32)
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok)                       # [n, H]
        we = w[tok, slot].unsqueeze(1)                    # [n, 1]
        Wg, Wu, Wd = gate[e].float(), up[e].float(), down[e].float()
        g = xe @ Wg.T                                     # [n, I]
        u = xe @ Wu.T
        if lora is not None:
            a_g = xe @ Ag[e].T                            # [n, r]
            a_u = xe @ Au[e].T
            g = g + s * (a_g @ Bg[e].T)
            u = u + s * (a_u @ Bu[e].T)
        if "gate" in biases:
            g = g + biases["gate"][e]
        if "up" in biases:
            u = u + biases["up"][e]
        h = _hidden(g, u, variant)                        # silu(g) * u by default
        o = h @ Wd.T                                      # [n, H]
        if lora is not None:
            a_d = h @ Ad[e].T
            o = o + s * (a_d @ Bd[e].T)
        if "down" in biases:
            o = o + biases["down"][e]
        y = y.index_add(0, tok, we * o)
    return y


def moe_reference_grads(x, ids, w, gate, up, down, lora, scale, gy, variant=None, biases=None):
    """Gradients of ``sum(moe_reference(...) * gy)`` by torch autograd, all float32.

    Leaves are float32 copies of x, w and the six LoRA tensors.  Returns a dict with "x"
    [T,H], "w" [T,k] and, when lora is not None, "gate_a", "gate_b", "up_a", "up_b",
    "down_a", "down_b" (PEFT shapes).
    """
    leaves = {
        "x": _as_tensor(x).detach().to(torch.float32).clone().requires_grad_(True),
        "w": _as_tensor(w).detach().to(torch.float32).clone().requires_grad_(True),
    }
    lora32 = None
    if lora is not None:
        s = _lora_scale(lora, scale)
        lora32 = {}
        for n in LORA_KEYS:
            leaves[n] = _as_tensor(_lora_get(lora, n)).detach().to(torch.float32).clone().requires_grad_(True)
            lora32[n] = leaves[n]
    else:
        s = None
    with torch.enable_grad():
        y = moe_reference(leaves["x"], ids, leaves["w"], gate, up, down, lora32, s, variant, biases)
        gy32 = _as_tensor(gy).detach().to(torch.float32)
        if y.requires_grad:
            params = list(leaves.values())
            grads = torch.autograd.grad(y, params, grad_outputs=gy32, allow_unused=True)
        else:  # nothing routed (e.g. T == 0 or all slots -1)
            grads = [None] * len(leaves)
    out = {}
    for (name, leaf), g in zip(leaves.items(), grads):
        out[name] = torch.zeros_like(leaf.detach()) if g is None else g.detach()
    return out


def rel_err(out, ref):
    """``||out - ref|| / ||ref||`` in float64 norms; ``||out||`` when ``||ref|| == 0``."""
    out = _as_tensor(out).detach().to(torch.float64)
    ref = _as_tensor(ref).detach().to(torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    nref = torch.linalg.vector_norm(ref).item()
    if nref == 0.0:
        return torch.linalg.vector_norm(out).item()
    return torch.linalg.vector_norm(out - ref).item() / nref


def moe_reference_pairs(x, ids, w, gate, up, down, lora, scale, gy, variant=None, biases=None):
    """Per routed pair (t, j), float32, written from MATH.md's forward and backward:
    ``h = silu(g) * u`` (or the variant's h, biases included) and ``dh_raw = Wd^T gy_t + s Ad^T (Bd^T gy_t)``,
    both [T, k, I] (zero at -1 and sentinel slots).  ``dw = (dh_raw * h).sum(-1)`` (+ ``gy_t . bd`` with a
    down bias).  ``w`` is unused (dh_raw is unweighted): the arguments are those of
    :func:`moe_reference_grads`."""
    biases = {k: _f32(v).detach() for k, v in (biases or {}).items() if v is not None}
    x, gy = _f32(x).detach(), _f32(gy).detach()
    gate, up, down = _as_tensor(gate), _as_tensor(up), _as_tensor(down)
    E, I = gate.shape[0], gate.shape[1]
    ids = _check_ids(ids, E)
    T, k = ids.shape
    if lora is not None:
        s = _lora_scale(lora, scale)
        Ag, Bg, Au, Bu, Ad, Bd = (_f32(_lora_get(lora, n)).detach() for n in LORA_KEYS)
    h = torch.zeros(T, k, I)
    dh_raw = torch.zeros(T, k, I)
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe, gye = x.index_select(0, tok), gy.index_select(0, tok)   # [n, H]
        g = xe @ gate[e].float().T                                  # [n, I]
        u = xe @ up[e].float().T
        d = gye @ down[e].float()                                   # Wd^T gy: [n, I]
        if lora is not None:
            g = g + s * ((xe @ Ag[e].T) @ Bg[e].T)
            u = u + s * ((xe @ Au[e].T) @ Bu[e].T)
            d = d + s * ((gye @ Bd[e]) @ Ad[e])
        if "gate" in biases:
            g = g + biases["gate"][e]
        if "up" in biases:
            u = u + biases["up"][e]
        h[tok, slot] = _hidden(g, u, variant)
        dh_raw[tok, slot] = d
    return h, dh_raw


def dw_magnitude(x, ids, w, gate, up, down, lora, scale, gy, variant=None, biases=None):
    """``m[t, j] = sum_i |dh_raw[i]| |h[i]|`` [T, k] (0 at -1 slots), plus ``sum_h |gy_t[h]| |bd[h]|`` with a
    down bias: dw is a dot product, and MATH.md bounds its error by that of the magnitudes,
    ``||dw - ref|| <= 1e-2 ||m||``."""
    h, dh_raw = moe_reference_pairs(x, ids, w, gate, up, down, lora, scale, gy, variant, biases)
    m = (dh_raw.abs() * h.abs()).sum(-1)
    if biases and biases.get("down") is not None:
        ids = _as_tensor(ids).to(torch.int64)
        bd = _f32(biases["down"]).detach().abs()
        routed = (ids >= 0) & (ids < bd.shape[0])
        gy = _f32(gy).detach().abs()
        m = m + torch.where(routed, (gy[:, None, :] * bd[ids.clamp(0, bd.shape[0] - 1)]).sum(-1), 0.0)
    return m


def dw_err(out, ref, m):
    """``||out - ref|| / ||m||`` in float64 norms (``||out - ref||`` when ``||m|| == 0``)."""
    out = _as_tensor(out).detach().to(torch.float64)
    ref = _as_tensor(ref).detach().to(torch.float64)
    if out.shape != ref.shape or ref.shape != m.shape:
        raise ValueError(f"shape mismatch: out {tuple(out.shape)}, ref {tuple(ref.shape)}, m {tuple(m.shape)}")
    diff = torch.linalg.vector_norm(out - ref).item()
    nm = torch.linalg.vector_norm(_as_tensor(m).to(torch.float64)).item()
    return diff / nm if nm > 0.0 else diff


# ----------------------------------------------------------------------------- problems
def make_problem(
    E,
    H,
    I,
    k,
    T,
    r,
    seed,
    dtype=torch.bfloat16,
    lora_b_nonzero=True,
    *,
    unused_frac=0.0,
    all_unused_tokens=(),
    idle_experts=0,
    alpha=None,
    lora_dtype=torch.float32,
    ids_dtype=torch.int64,
    w_dtype=torch.float32,
):
    """Random test inputs with realistic scales.

    - gate/up ~ randn * H**-0.5, down ~ randn * I**-0.5 (``dtype``, default bf16), so every
      intermediate is O(1).
    - x ~ randn (``dtype``); ids: k distinct experts per token (top-k of random scores),
      drawn from the experts that are not idle; w: softmax of the top-k scores (positive,
      sums to 1 per token), ``w_dtype``.
    - LoRA (PEFT shapes, ``lora_dtype``): A ~ randn * fan_in**-0.5, B ~ randn * 0.5 * r**-0.5
      (zeros when ``lora_b_nonzero`` is False, i.e. PEFT init), alpha = 2 r by default so
      scale = 2 and the LoRA terms are of the same order as the base terms.
    - ``unused_frac``: fraction of (token, slot) pairs set to -1 (their w stays non-zero, so
      an implementation that ignores -1 wrongly is caught).
    - ``all_unused_tokens``: token indices whose every slot is -1.
    - ``idle_experts``: number of experts (chosen at random) that receive no token.

    Returns a SimpleNamespace with x, ids, w, gate, up, down, gate_up ([E,2I,H], gate rows
    first), lora (dict of the six tensors), alpha, scale, r, E, H, I, k, T, idle (list of idle
    expert ids).
    """
    gen = torch.Generator().manual_seed(int(seed))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    n_active = E - idle_experts
    if not (1 <= k <= n_active):
        raise ValueError(f"need 1 <= k <= E - idle_experts, got k={k}, E={E}, idle={idle_experts}")
    perm = torch.randperm(E, generator=gen)
    active = perm[:n_active].sort().values
    idle = perm[n_active:].sort().values.tolist()

    gate = (randn(E, I, H) * H ** -0.5).to(dtype)
    up = (randn(E, I, H) * H ** -0.5).to(dtype)
    down = (randn(E, H, I) * I ** -0.5).to(dtype)
    x = randn(T, H).to(dtype)

    scores = randn(T, n_active)
    top_scores, top_idx = scores.topk(k, dim=1) if T > 0 else (torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64))
    ids = active[top_idx]
    w = torch.softmax(top_scores, dim=1)
    if unused_frac > 0 and T > 0:
        mask = torch.rand(T, k, generator=gen) < unused_frac
        ids = ids.masked_fill(mask, -1)
    for t in all_unused_tokens:
        ids[t] = -1
    ids = ids.to(ids_dtype)
    w = w.to(w_dtype)

    B_mult = 1.0 if lora_b_nonzero else 0.0
    lora = {
        "gate_a": randn(E, r, H) * H ** -0.5,
        "gate_b": randn(E, I, r) * (0.5 * r ** -0.5) * B_mult,
        "up_a": randn(E, r, H) * H ** -0.5,
        "up_b": randn(E, I, r) * (0.5 * r ** -0.5) * B_mult,
        "down_a": randn(E, r, I) * I ** -0.5,
        "down_b": randn(E, H, r) * (0.5 * r ** -0.5) * B_mult,
    }
    lora = {n: t.to(lora_dtype) for n, t in lora.items()}
    if alpha is None:
        alpha = 2.0 * r
    return SimpleNamespace(
        x=x,
        ids=ids,
        w=w,
        gate=gate,
        up=up,
        down=down,
        gate_up=torch.cat([gate, up], dim=1),
        lora=lora,
        alpha=float(alpha),
        scale=float(alpha) / r,
        r=r,
        E=E,
        H=H,
        I=I,
        k=k,
        T=T,
        idle=idle,
    )


# ----------------------------------------------------------------------------- peers
def _zeros_with_graph(x):
    """zeros_like(x) that is still connected to x's autograd graph (grad 0, NaN-safe)."""
    idx = torch.zeros(0, dtype=torch.int64)
    return torch.zeros_like(x).index_add(0, idx, x.index_select(0, idx))


def _peer_lora(lora, dtype):
    if lora is None:
        return None
    return {n: _as_tensor(_lora_get(lora, n)).to(dtype) for n in LORA_KEYS}


def eager_loop_moe(x, ids, w, gate, up, down, lora=None, scale=None):
    """Peer: bf16 per-expert python loop, like transformers' eager experts.

    For each expert that has tokens: gather its tokens, ``F.linear`` gate / up / down in the
    compute dtype (x's dtype, normally bf16), LoRA as extra small matmuls
    ``s * B(A x)``, weight by the routing weight and ``index_add`` into the output.
    Differentiable w.r.t. x, w and the LoRA tensors.  Returns y in x's dtype.
    """
    dt = x.dtype
    E = gate.shape[0]
    ids = _as_tensor(ids).to(torch.int64)
    L = _peer_lora(lora, dt)
    s = _lora_scale(lora, scale) if lora is not None else 0.0
    wd = w.to(dt)
    y = _zeros_with_graph(x)
    hit = torch.unique(ids[ids >= 0]).tolist()
    for e in hit:
        tok, slot = torch.where(ids == e)
        xe = x[tok]
        g = F.linear(xe, gate[e])
        u = F.linear(xe, up[e])
        if L is not None:
            g = g + s * F.linear(F.linear(xe, L["gate_a"][e]), L["gate_b"][e])
            u = u + s * F.linear(F.linear(xe, L["up_a"][e]), L["up_b"][e])
        h = F.silu(g) * u
        o = F.linear(h, down[e])
        if L is not None:
            o = o + s * F.linear(F.linear(h, L["down_a"][e]), L["down_b"][e])
        o = o * wd[tok, slot, None]
        y = y.index_add(0, tok, o.to(dt))
    return y


def _pad_to(t, dim, mult):
    n = t.shape[dim]
    p = (-n) % mult
    if p == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [0, p]
    return F.pad(t, pad)


def _gmm(a, b, offs):
    """Grouped matmul: rows ``offs[e-1]:offs[e]`` of ``a`` [N,K] times ``b[e]`` [K,M].

    Uses ``torch._grouped_mm`` (present on CPU in torch 2.13; it needs 16-byte aligned
    strides, so K and M are zero-padded to multiples of 8 elements when needed, which does
    not change the product).  Falls back to a per-group ``mm`` loop if ``_grouped_mm`` is
    absent.
    """
    N, K = a.shape
    M = b.shape[-1]
    if HAS_GROUPED_MM:
        mult = max(1, 16 // a.element_size())
        aligned = (
            K % mult == 0
            and M % mult == 0
            and all(st % mult == 0 for st in b.stride() if st != 1)
        )
        if aligned:
            return torch._grouped_mm(a, b, offs=offs)
        ap = _pad_to(a, 1, mult)
        bp = _pad_to(_pad_to(b, 1, mult), 2, mult).contiguous()
        return torch._grouped_mm(ap, bp, offs=offs)[:, :M]
    outs = []
    start = 0
    for e, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ b[e])
        start = end
    return torch.cat(outs, 0) if outs else a.new_zeros(0, M)


def grouped_mm_moe(x, ids, w, gate, up, down, lora=None, scale=None):
    """Peer: transformers' grouped_mm experts in bf16.

    Flattens the routed (token, slot) pairs, sorts them by expert, builds cumulative
    offsets and runs one ``torch._grouped_mm`` per projection over all experts (LoRA as
    extra grouped matmuls ``s * B(A x)``), then weights by w and ``index_add``s back.
    ``torch._grouped_mm`` exists on CPU in this torch (2.13); if it did not, :func:`_gmm`
    falls back to an equivalent per-expert ``mm`` loop.  Differentiable w.r.t. x, w and the
    LoRA tensors.  Returns y in x's dtype.
    """
    dt = x.dtype
    T, H = x.shape
    E = gate.shape[0]
    k = ids.shape[1] if ids.dim() == 2 else 1
    ids = _as_tensor(ids).to(torch.int64)
    L = _peer_lora(lora, dt)
    s = _lora_scale(lora, scale) if lora is not None else 0.0
    flat = ids.reshape(-1)
    valid = (flat >= 0).nonzero(as_tuple=True)[0]
    if valid.numel() == 0:
        return _zeros_with_graph(x)  # keeps the graph so backward gives zeros
    order = flat[valid].argsort(stable=True)
    route = valid[order]                     # flat (token, slot) index, sorted by expert
    eids = flat[route]
    tok = route // k
    counts = torch.bincount(eids, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)

    xs = x[tok]
    g = _gmm(xs, gate.transpose(-2, -1), offs)
    u = _gmm(xs, up.transpose(-2, -1), offs)
    if L is not None:
        g = g + s * _gmm(_gmm(xs, L["gate_a"].transpose(-2, -1), offs), L["gate_b"].transpose(-2, -1), offs)
        u = u + s * _gmm(_gmm(xs, L["up_a"].transpose(-2, -1), offs), L["up_b"].transpose(-2, -1), offs)
    h = F.silu(g) * u
    o = _gmm(h, down.transpose(-2, -1), offs)
    if L is not None:
        o = o + s * _gmm(_gmm(h, L["down_a"].transpose(-2, -1), offs), L["down_b"].transpose(-2, -1), offs)
    o = o * w.to(dt).reshape(-1)[route].unsqueeze(1)
    return torch.zeros_like(x).index_add(0, tok, o.to(dt))


_EXPERTS_IMPLS = {"eager": eager_loop_moe, "grouped_mm": grouped_mm_moe}


class TorchLoRAExperts(torch.nn.Module):
    """Peer and reference for kt_functional.torch.KTExperts: the same experts in plain torch.

    Frozen weights (gate_up [E, 2I, H], gate rows first; down [E, H, I]) and the six LoRA
    tensors as parameters (MATH.md's shapes), computed in the input's dtype by
    :func:`eager_loop_moe` (impl="eager") or :func:`grouped_mm_moe` (impl="grouped_mm").
    Drop-in for a transformers v5 experts module: forward(hidden_states, top_k_index, top_k_weights).
    """

    def __init__(self, gate_up, down, lora: Mapping, alpha: float, impl: str = "eager"):
        super().__init__()
        if impl not in _EXPERTS_IMPLS:
            raise ValueError(f"impl: expected one of {sorted(_EXPERTS_IMPLS)}, got {impl!r}")
        self.impl = _EXPERTS_IMPLS[impl]
        I = gate_up.shape[1] // 2
        self.register_buffer("gate", gate_up[:, :I].detach().clone())
        self.register_buffer("up", gate_up[:, I:].detach().clone())
        self.register_buffer("down", down.detach().clone())
        for name in LORA_KEYS:
            setattr(self, name, torch.nn.Parameter(_as_tensor(lora[name]).detach().clone()))
        self.scale = alpha / self.gate_a.shape[1]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        lora = {name: getattr(self, name) for name in LORA_KEYS}
        return self.impl(hidden_states, top_k_index, top_k_weights, self.gate, self.up, self.down, lora, self.scale)


# ---- Quantized base weights (MATH.md, "Quantized base weights") -------------------------------------------------
# Written from MATH.md's table, independent of the kernels and of kt_functional.quant: each takes one
# projection's checkpoint tensors stacked over experts and returns W [E, out, in] as code * scale in fp32,
# so tests compare the kernels' decoded weights (ExpertWeights.dequantize(), bf16-rounded) with bf16(these).

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def dequantize_int8(codes, scales):
    return codes.float() * scales.float()[..., None]


def dequantize_fp8_block(codes, scale_inv, block=128):
    out, inp = codes.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :out, :inp]
    return codes.float() * s


def dequantize_int4_group(weight_packed, weight_scale, inp, group=32):
    words = weight_packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).flatten(-2)[..., :inp]
    q = nibbles.float() - 8  # stored as q + 8
    s = weight_scale.float().repeat_interleave(group, dim=-1)[..., :inp]
    return q * s


def dequantize_mxfp4(blocks, scales, inp):
    lut = torch.tensor(_E2M1 + tuple(-v for v in _E2M1))
    codes = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).flatten(-2).long()  # [..., G, 32]
    values = lut[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2)[..., :inp]


def dequantize_checkpoint(storage, tensors, inp):
    """W [E, out, in] fp32 of one projection's checkpoint tensors in `storage` (in: the input size)."""
    codes, scales = tensors
    if storage == "int8":
        return dequantize_int8(codes, scales)
    if storage == "fp8_block":
        return dequantize_fp8_block(codes, scales)
    if storage == "int4_group":
        return dequantize_int4_group(codes, scales, inp)
    if storage == "mxfp4":
        return dequantize_mxfp4(codes, scales, inp)
    raise ValueError(f"storage: unknown {storage!r}")
