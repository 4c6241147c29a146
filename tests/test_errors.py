"""Bad input gives ValueError or TypeError whose message names the argument; after every
error the same state still gives correct results."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers import check_state, ktf, make_gy, make_lora, make_problem, make_state, make_weights

ERRORS = (ValueError, TypeError)


@pytest.fixture(scope="module")
def prob():
    return make_problem(E=4, H=32, I=24, k=2, T=5, r=2, seed=77)


@pytest.fixture(scope="module")
def state(prob):
    return make_state(prob)


@pytest.fixture
def checked(prob, state):
    """Yields the state; afterwards, the same state must still give correct results."""
    yield state
    check_state(state, prob, where="[after an error]")


def _names(*names):
    """Regex matching any of the argument names as a word."""
    return r"\b(" + "|".join(re.escape(n) for n in names) + r")\b"


def raises_naming(*names):
    return pytest.raises(ERRORS, match=_names(*names))


def _fwd(state, prob, **kw):
    args = dict(x=prob.x, ids=prob.ids, w=prob.w)
    args.update(kw)
    return ktf().moe_forward(state, args["x"], args["ids"], args["w"])


# ----------------------------------------------------------------------------- forward inputs
BAD_FORWARD = {
    "x_int": ("x", lambda p: dict(x=p.x.to(torch.int32))),
    "x_object_array": ("x", lambda p: dict(x=np.array([["a"] * p.H] * p.T, dtype=object))),
    "x_1d": ("x", lambda p: dict(x=p.x[0])),
    "x_3d": ("x", lambda p: dict(x=p.x[None])),
    "x_wrong_H": ("x", lambda p: dict(x=torch.zeros(p.T, p.H + 8, dtype=torch.bfloat16))),
    "x_list": ("x", lambda p: dict(x=p.x.tolist())),
    "x_string": ("x", lambda p: dict(x="not a tensor")),
    "x_none": ("x", lambda p: dict(x=None)),
    "ids_float": ("ids", lambda p: dict(ids=p.ids.float())),
    "ids_1d": ("ids", lambda p: dict(ids=p.ids[:, 0])),
    "ids_wrong_T": ("ids", lambda p: dict(ids=p.ids[:-1], w=p.w[:-1])),
    "ids_lt_minus1": ("ids", lambda p: dict(ids=torch.where(torch.arange(p.k) == 1, -2, p.ids))),
    "ids_string": ("ids", lambda p: dict(ids="junk")),
    "ids_w_shape_mismatch": (("ids", "w"), lambda p: dict(w=torch.ones(p.T, p.k + 1))),
    "w_int": ("w", lambda p: dict(w=torch.ones(p.T, p.k, dtype=torch.int64))),
    "w_wrong_T": ("w", lambda p: dict(w=p.w[:-1])),
    "w_none": ("w", lambda p: dict(w=None)),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_forward_input(prob, checked, case):
    names, make = BAD_FORWARD[case]
    names = (names,) if isinstance(names, str) else names
    with raises_naming(*names):
        _fwd(checked, prob, **make(prob))


def test_bad_state_argument(prob, checked):
    with raises_naming("state"):
        ktf().moe_forward("not a state", prob.x, prob.ids, prob.w)
    cache = _cache(checked, prob)
    with raises_naming("state"):
        ktf().moe_backward("not a state", cache, make_gy(prob))


# ----------------------------------------------------------------------------- backward inputs
def _cache(state, prob):
    _, cache = ktf().moe_forward(state, prob.x, prob.ids, prob.w)
    return cache


BAD_GY = {
    "gy_wrong_H": lambda p: torch.zeros(p.T, p.H + 1, dtype=torch.bfloat16),
    "gy_wrong_T": lambda p: torch.zeros(p.T + 1, p.H, dtype=torch.bfloat16),
    "gy_1d": lambda p: torch.zeros(p.H, dtype=torch.bfloat16),
    "gy_int": lambda p: torch.zeros(p.T, p.H, dtype=torch.int32),
    "gy_string": lambda p: "junk",
}


@pytest.mark.parametrize("case", list(BAD_GY))
def test_bad_gy(prob, checked, case):
    cache = _cache(checked, prob)
    with raises_naming("gy"):
        ktf().moe_backward(checked, cache, BAD_GY[case](prob))


@pytest.mark.parametrize("junk", ["junk", None, 3, object()], ids=["str", "None", "int", "object"])
def test_bad_cache_object(prob, checked, junk):
    with raises_naming("cache"):
        ktf().moe_backward(checked, junk, make_gy(prob))


def test_cache_from_no_save_forward(prob, checked):
    y, none = ktf().moe_forward(checked, prob.x, prob.ids, prob.w, save_for_backward=False)
    assert none is None
    with raises_naming("cache"):
        ktf().moe_backward(checked, none, make_gy(prob))


def test_consumed_cache(prob, checked):
    cache = _cache(checked, prob)
    ktf().moe_backward(checked, cache, make_gy(prob))
    with pytest.raises(ValueError, match=_names("cache")):
        ktf().moe_backward(checked, cache, make_gy(prob))


def test_foreign_cache(prob, checked):
    other = make_state(prob)
    cache = _cache(other, prob)
    with pytest.raises(ValueError, match=_names("cache")):
        ktf().moe_backward(checked, cache, make_gy(prob))


# ----------------------------------------------------------------------------- state construction
@pytest.mark.parametrize("threads", [0, -1])
def test_bad_threads(prob, checked, threads):
    with raises_naming("threads"):
        ktf().MoEState(make_weights(prob), None, threads=threads)


def test_threads_not_int(prob, checked):
    with raises_naming("threads"):
        ktf().MoEState(make_weights(prob), None, threads="two")


def test_bad_isa(prob, checked):
    with raises_naming("isa"):
        ktf().MoEState(make_weights(prob), None, threads=1, isa="bogus")


def test_unavailable_isa(prob, checked):
    missing = [i for i in ("amx", "avx512", "avx2") if i not in ktf().available_isas()]
    if not missing:
        pytest.skip("this CPU and build support every ISA path: none to request wrongly")
    for isa in missing:
        with raises_naming("isa"):
            ktf().MoEState(make_weights(prob), None, threads=1, isa=isa)


def test_bad_weights_argument(prob, checked):
    with raises_naming("weights"):
        ktf().MoEState("not weights", None, threads=1)
    with raises_naming("lora"):
        ktf().MoEState(make_weights(prob), "not a lora", threads=1)


BAD_WEIGHTS = {
    "up_shape": ("up", lambda p: (p.gate, p.up[:, :-1], p.down)),
    "down_shape": ("down", lambda p: (p.gate, p.up, p.down[:, :, :-1])),
    "gate_E": (("gate", "up", "down"), lambda p: (p.gate[:-1], p.up, p.down)),
    "gate_2d": ("gate", lambda p: (p.gate[0], p.up, p.down)),
    "gate_int": ("gate", lambda p: (p.gate.to(torch.int32), p.up, p.down)),
    "down_string": ("down", lambda p: (p.gate, p.up, "junk")),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_expert_weights(prob, checked, case):
    names, make = BAD_WEIGHTS[case]
    names = (names,) if isinstance(names, str) else names
    with raises_naming(*names):
        ktf().ExpertWeights.from_tensors(*make(prob))


def test_bad_fused_weights(prob, checked):
    with raises_naming("gate_up"):
        ktf().ExpertWeights.from_fused(prob.gate_up[:, :-1], prob.down)  # odd 2I
    with raises_naming("gate_up", "down"):
        ktf().ExpertWeights.from_fused(prob.gate_up, prob.down[:, :, :-2])


def _resized(t, dim, delta):
    shape = list(t.shape)
    shape[dim] += delta
    return torch.randn(shape)


BAD_LORA = {
    "rank_mismatch": (("gate_a", "up_a", "rank"), lambda p: dict(
        gate_a=torch.randn(p.E, 4, p.H), gate_b=torch.randn(p.E, p.I, 4),
        up_a=torch.randn(p.E, 8, p.H), up_b=torch.randn(p.E, p.I, 8))),
    "gate_b_wrong_I": ("gate_b", lambda p: dict(gate_b=_resized(p.lora["gate_b"], 1, 3))),
    "gate_b_wrong_rank": ("gate_b", lambda p: dict(gate_b=_resized(p.lora["gate_b"], 2, 1))),
    "up_a_wrong_H": ("up_a", lambda p: dict(up_a=_resized(p.lora["up_a"], 2, 8))),
    "down_a_wrong_I": ("down_a", lambda p: dict(down_a=_resized(p.lora["down_a"], 2, 1))),
    "down_b_wrong_E": ("down_b", lambda p: dict(down_b=_resized(p.lora["down_b"], 0, 1))),
    "down_b_2d": ("down_b", lambda p: dict(down_b=p.lora["down_b"][0])),
    "gate_a_int": ("gate_a", lambda p: dict(gate_a=p.lora["gate_a"].to(torch.int32))),
    "up_b_string": ("up_b", lambda p: dict(up_b="junk")),
    "down_a_none": ("down_a", lambda p: dict(down_a=None)),
}


@pytest.mark.parametrize("case", list(BAD_LORA))
def test_bad_lora(prob, checked, case):
    names, make = BAD_LORA[case]
    names = (names,) if isinstance(names, str) else names
    with raises_naming(*names):
        make_lora(prob, **make(prob))


def test_lora_does_not_fit_weights(prob, checked):
    """A self-consistent LoRA for other sizes is rejected when the state is built."""
    other = make_problem(E=prob.E, H=prob.H + 8, I=prob.I, k=2, T=3, r=2, seed=1)
    lora = make_lora(other)
    with pytest.raises(ERRORS, match=r"(?i)\b(lora|gate_a|up_a|down_b|hidden|H)\b"):
        ktf().MoEState(make_weights(prob), lora, threads=1)
    other = make_problem(E=prob.E + 1, H=prob.H, I=prob.I, k=2, T=3, r=2, seed=1)
    with pytest.raises(ERRORS, match=r"(?i)\b(lora|gate_a|gate_b|up_a|up_b|down_a|down_b|experts|E)\b"):
        ktf().MoEState(make_weights(prob), make_lora(other), threads=1)


def test_bad_alpha(prob, checked):
    with raises_naming("alpha"):
        ktf().LoRA(**prob.lora, alpha="big")
