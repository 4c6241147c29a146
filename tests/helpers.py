"""Shared helpers for the kt_functional test suite.

The float32 reference (``kt_functional/reference.py``) is loaded without needing the
compiled library: ``from kt_functional import reference`` when the package imports, else the
file is loaded standalone by path.  The library itself is imported lazily (``ktf()``) so that
``tests/test_reference.py`` runs before the library builds.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Mapping

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: MATH.md tolerance: ||out - ref|| / ||ref|| <= 1e-2 for every output but dw, whose bound is
#: ||dw - ref|| <= 1e-2 ||m|| (plus the relative one when T*k >= 64).  Never loosen it.
TOL = 1e-2
#: Key of the reference grads holding dw's error scale m [T, k] (reference.dw_magnitude).
W_MAGNITUDE = "w_magnitude"
#: From this many (token, slot) pairs on, dw is also held to the relative bound (MATH.md).
DW_RELATIVE_MIN_PAIRS = 64

LORA_KEYS = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def _load_reference():
    try:
        from kt_functional import reference as mod  # noqa: PLC0415

        return mod
    except Exception:  # the package does not import yet (not built): load the file by path
        name = "kt_functional_reference_standalone"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, ROOT / "kt_functional" / "reference.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod


ref = _load_reference()
make_problem = ref.make_problem
rel_err = ref.rel_err


def ktf():
    """The library (imported lazily: a failure to import is a test error, never a skip)."""
    import kt_functional  # noqa: PLC0415

    return kt_functional


# ----------------------------------------------------------------------------- conversions
def to_torch(a):
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.array(a))
    return torch.as_tensor(a)


def lora_tensors(lora):
    """The six LoRA tensors of a ``ktf.LoRA`` or a dict, as a dict."""
    if isinstance(lora, Mapping):
        return {n: lora[n] for n in LORA_KEYS}
    return {n: getattr(lora, n) for n in LORA_KEYS}


def grads_dict(grads):
    """Library grads -> dict of torch tensors ("x", "w" and the six LoRA keys if any)."""
    out = {"x": to_torch(grads.x), "w": to_torch(grads.w)}
    if grads.lora is not None:
        out.update({n: to_torch(t) for n, t in lora_tensors(grads.lora).items()})
    return out


def make_gy(prob, seed=1234, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(prob.T, prob.H, generator=gen).to(dtype)


# ----------------------------------------------------------------------------- builders
def make_weights(prob, fused=False):
    K = ktf()
    if fused:
        return K.ExpertWeights.from_fused(prob.gate_up, prob.down)
    return K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down)


def make_lora(prob, **overrides):
    """``ktf.LoRA`` from the problem's six tensors (``overrides`` replace some of them)."""
    tensors = dict(prob.lora)
    tensors.update(overrides)
    return ktf().LoRA(**tensors, alpha=prob.alpha)


def make_state(prob, isa=None, *, lora=True, threads=2, fused=False, weights=None):
    """MoEState for a problem.  ``lora``: True (the problem's LoRA), False/None (no LoRA) or
    a ``ktf.LoRA`` object."""
    K = ktf()
    if weights is None:
        weights = make_weights(prob, fused=fused)
    if lora is True:
        lora = make_lora(prob)
    elif lora is False:
        lora = None
    return K.MoEState(weights, lora, threads=threads, isa=isa)


# ----------------------------------------------------------------------------- reference
def reference(prob, *, x=None, ids=None, w=None, lora="problem", gy=None, gate=None, up=None, down=None):
    """(y_ref, grads_ref) of the float32 reference; inputs default to the problem's."""
    x = prob.x if x is None else x
    ids = prob.ids if ids is None else ids
    w = prob.w if w is None else w
    gate = prob.gate if gate is None else gate
    up = prob.up if up is None else up
    down = prob.down if down is None else down
    if isinstance(lora, str) and lora == "problem":
        lora_t, scale = prob.lora, prob.scale
    elif lora is None or lora is False:
        lora_t, scale = None, None
    elif isinstance(lora, Mapping):  # a dict of the six tensors, with the problem's scale
        lora_t, scale = {n: lora[n] for n in LORA_KEYS}, prob.scale
    else:  # a ktf.LoRA (or anything with the six attributes and .scale)
        lora_t, scale = lora_tensors(lora), lora.scale
    x, ids, w = to_torch(x), to_torch(ids), to_torch(w)
    y_ref = ref.moe_reference(x, ids, w, gate, up, down, lora_t, scale)
    g_ref = None
    if gy is not None:
        args = (x, ids, w, gate, up, down, lora_t, scale, to_torch(gy))
        g_ref = ref.moe_reference_grads(*args)
        g_ref[W_MAGNITUDE] = ref.dw_magnitude(*args)
    return y_ref, g_ref


def grad_errors(grads, g_ref):
    """MATH.md's error measure of each gradient in ``grads`` (a dict) vs ``g_ref`` (whose "w" comes
    with ``g_ref[W_MAGNITUDE]``): relative for all; for "w" the bound ||dw - ref|| / ||m||, and
    also the relative error ("w_rel") when T*k >= 64."""
    errs = {}
    for name, out in grads.items():
        r = g_ref[name]
        assert tuple(out.shape) == tuple(r.shape), f"grads.{name} shape {tuple(out.shape)} != {tuple(r.shape)}"
        if name == "w":
            errs["w"] = ref.dw_err(out, r, g_ref[W_MAGNITUDE])
            if r.numel() >= DW_RELATIVE_MIN_PAIRS:
                errs["w_rel"] = rel_err(out, r)
        else:
            errs[name] = rel_err(out, r)
    return errs


def errors_vs_reference(y, grads, y_ref, g_ref):
    errs = {"y": rel_err(to_torch(y), y_ref)}
    if grads is not None:
        gd = grads_dict(grads)
        expected = set(g_ref) - {W_MAGNITUDE}
        assert set(gd) == expected, f"grad keys {sorted(gd)} != reference keys {sorted(expected)}"
        errs.update(grad_errors(gd, g_ref))
    return errs


def assert_matches_reference(y, grads, y_ref, g_ref, tol=TOL, where=""):
    assert tuple(to_torch(y).shape) == tuple(y_ref.shape), f"y shape {tuple(to_torch(y).shape)} != {tuple(y_ref.shape)}"
    errs = errors_vs_reference(y, grads, y_ref, g_ref)
    bad = {k: v for k, v in errs.items() if not (v <= tol)}
    assert not bad, f"{where} errors above {tol}: {bad} (all: {errs})"
    return errs


def fwd_bwd(state, x, ids, w, gy):
    K = ktf()
    y, cache = K.moe_forward(state, x, ids, w)
    grads = K.moe_backward(state, cache, gy)
    return y, grads


def check_state(state, prob, *, x=None, ids=None, w=None, gy=None, lora="problem", where=""):
    """Forward + backward on ``state`` and compare every output with the reference."""
    x = prob.x if x is None else x
    ids = prob.ids if ids is None else ids
    w = prob.w if w is None else w
    gy = make_gy(prob) if gy is None else gy
    y, grads = fwd_bwd(state, x, ids, w, gy)
    y_ref, g_ref = reference(prob, x=x, ids=ids, w=w, lora=lora, gy=gy)
    assert_matches_reference(y, grads, y_ref, g_ref, where=where)
    if lora is None or lora is False:
        assert grads.lora is None, "state without LoRA must give grads.lora is None"
    return y, grads, y_ref, g_ref


# ----------------------------------------------------------------------------- layout
def transposed_view(t):
    """Same values, non-contiguous: the last two dims stored transposed."""
    v = t.transpose(-2, -1).contiguous().transpose(-2, -1)
    assert torch.equal(v, t) and (t.numel() <= 1 or not v.is_contiguous() or min(t.shape[-2:]) <= 1)
    return v


def strided_view(t):
    """Same values, non-contiguous: every other column of a twice-as-wide buffer."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    v = buf[..., ::2]
    assert torch.equal(v, t)
    return v


# ----------------------------------------------------------------------------- memory
def rss_bytes():
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def settle():
    """Frees what is garbage and the kernels' cached workspaces: RSS then counts live memory."""
    gc.collect()
    gc.collect()
    ktf().release_workspaces()


def run_python_json(code: str) -> dict:
    """Runs code in a fresh interpreter (tests/ on its path); returns the JSON its last line prints."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
