"""MoEState(partitions=N): I split across partitions with their own pools and packed slices, partial results
reduced in a fixed order. Against the fp32 reference (MATH.md tolerance), against one partition, and bitwise
run to run, on every ISA path."""
from __future__ import annotations

import copy
import glob
import os
import pickle

import pytest
import torch

from helpers import (LORA_KEYS, TOL, check_state, fwd_bwd, grads_dict, ktf, make_gy, make_lora, make_problem,
                     make_weights, rel_err)

CASES = {
    "awkward": dict(E=5, H=72, I=40, k=3, T=29, r=3, unused_frac=0.2),
    "aligned": dict(E=8, H=96, I=96, k=2, T=33, r=4, idle_experts=3),
    "T1": dict(E=4, H=40, I=24, k=2, T=1, r=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("partitions", [2, 3])
def test_partitions_match_reference_and_one_partition(isa, case, partitions):
    prob = make_problem(**CASES[case], seed=303 + list(CASES).index(case))
    K = ktf()
    weights, lora, gy = make_weights(prob), make_lora(prob), make_gy(prob)
    whole = K.MoEState(weights, lora, threads=2, isa=isa)
    split = K.MoEState(weights, lora, threads=2, isa=isa, partitions=partitions)
    assert len(split.partition_states()) == partitions
    y, grads, _, _ = check_state(split, prob, gy=gy, where=f"[{isa}/{case}/partitions={partitions}]")
    y1, grads1 = fwd_bwd(whole, prob.x, prob.ids, prob.w, gy)
    assert y.dtype == y1.dtype and rel_err(y.float(), y1.float()) <= TOL
    g, g1 = grads_dict(grads), grads_dict(grads1)
    for name in g1:
        assert g[name].dtype == g1[name].dtype and rel_err(g[name], g1[name]) <= TOL, name
    y2, grads2 = fwd_bwd(split, prob.x, prob.ids, prob.w, gy)  # run to run: bitwise
    assert torch.equal(y, y2)
    for name, t in grads_dict(grads2).items():
        assert torch.equal(t, g[name]), name


def test_partitions_see_in_place_lora_updates(isa):
    """The partitions' LoRA are views of the state's tensors: an optimizer step is seen by the next call."""
    prob = make_problem(**CASES["awkward"], seed=310)
    K = ktf()
    lora = make_lora(prob, **{n: t.clone() for n, t in prob.lora.items()})
    params = [getattr(lora, n).requires_grad_(True) for n in LORA_KEYS]
    state = K.MoEState(make_weights(prob), lora, threads=2, isa=isa, partitions=2)
    opt = torch.optim.SGD(params, lr=0.05)
    y_before, _ = K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    for _ in range(2):
        y, cache = K.moe_forward(state, prob.x, prob.ids, prob.w)
        grads = K.moe_backward(state, cache, make_gy(prob))
        for p, n in zip(params, LORA_KEYS):
            p.grad = getattr(grads.lora, n)
        opt.step()
    updated = {n: getattr(lora, n).detach().clone() for n in LORA_KEYS}
    assert not torch.equal(updated["gate_b"], prob.lora["gate_b"])
    y_ref, _ = K.moe_forward(K.MoEState(make_weights(prob), K.LoRA(**updated, alpha=prob.alpha), isa=isa),
                             prob.x, prob.ids, prob.w, save_for_backward=False)
    y, _ = K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    assert rel_err(y.float(), y_ref.float()) <= TOL < rel_err(y_before.float(), y_ref.float())


def test_partitioned_weights_are_packed_once(isa):
    """ExpertWeights.from_tensors(partitions=N) packs only the slices; a state made from them uses them as they are."""
    K = ktf()
    prob = make_problem(**CASES["awkward"], seed=315)
    weights = K.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, partitions=2)
    assert weights.partitions == 2 and weights.packed is None
    assert [p.intermediate_size for p in weights.parts] == [20, 20]
    assert weights.nbytes == sum(p.nbytes for p in weights.parts)
    for got, src in zip(weights.dequantize(), (prob.gate, prob.up, prob.down)):
        assert torch.equal(got, src.float())
    state = K.MoEState(weights, make_lora(prob), threads=2, isa=isa)
    assert [p.weights for p in state.partition_states()] == list(weights.parts)
    check_state(state, prob, where=f"[{isa}/partitioned weights]")
    copy = pickle.loads(pickle.dumps(weights))
    assert copy.partitions == 2 and all(torch.equal(a, b) for a, b in zip(copy.dequantize(), weights.dequantize()))
    with pytest.raises(ValueError, match="partitions: the weights are packed in 2 partitions"):
        K.MoEState(weights, partitions=3)


def test_numa_uses_the_machine_nodes():
    K = ktf()
    nodes = K.numa_nodes()
    assert nodes and all(cpus for cpus in nodes)
    prob = make_problem(**CASES["aligned"], seed=320)
    state = K.MoEState(make_weights(prob), make_lora(prob), numa=True)
    assert len(state.partition_states()) == len(nodes)
    check_state(state, prob, where="[numa=True]")
    with pytest.raises(ValueError, match=r"partitions: numa=True makes one partition per NUMA node"):
        K.MoEState(make_weights(prob), numa=True, partitions=len(nodes) + 1)


def test_partitioned_state_errors_pickle_and_replace():
    from dataclasses import replace

    K = ktf()
    prob = make_problem(**CASES["T1"], seed=330)
    weights = make_weights(prob)
    for bad, err in ((0, ValueError), (True, ValueError), (prob.I + 1, ValueError)):
        with pytest.raises(err, match="partitions"):
            K.MoEState(weights, partitions=bad)
    with pytest.raises(TypeError, match="numa: expected a bool"):
        K.MoEState(weights, numa="yes")
    state = K.MoEState(weights, make_lora(prob), partitions=2)
    copy = pickle.loads(pickle.dumps(state))
    assert copy.partitions == 2 and len(copy.partition_states()) == 2
    y, _ = K.moe_forward(state, prob.x, prob.ids, prob.w, save_for_backward=False)
    y_copy, _ = K.moe_forward(copy, prob.x, prob.ids, prob.w, save_for_backward=False)
    assert torch.equal(y, y_copy)
    # States that differ only in their LoRA share the partitions' packed weights.
    other = replace(state, lora=None)
    assert [p.weights for p in other.partition_states()] == [p.weights for p in state.partition_states()]


def test_patch_model_with_partitions():
    pytest.importorskip("transformers")
    from hf_models import batch, build, lora_grads, randomize_lora_b

    from kt_functional import hf

    base = build("qwen3_moe")
    results = []
    for partitions in (1, 2):
        model = hf.patch_model(copy.deepcopy(base), lora_rank=4, lora_alpha=8, threads=2, partitions=partitions)
        randomize_lora_b(model)
        ids = batch()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    (loss1, grads1), (loss2, grads2) = results
    assert abs(loss2 - loss1) <= TOL * loss1
    for key, g in grads1.items():
        assert rel_err(grads2[key], g) <= TOL, key


def _threads_pinned_to(cpus: str) -> int:
    """Threads of this process whose allowed CPUs are exactly cpus (as /proc writes the list)."""
    count = 0
    for status in glob.glob("/proc/self/task/*/status"):
        with open(status) as f:
            if f"Cpus_allowed_list:\t{cpus}\n" in f.read():
                count += 1
    return count


def test_numa_partitions_pin_their_pools(monkeypatch):
    """Two (pretend) nodes: each partition's workers are pinned to its node's CPUs; results as one partition's."""
    import kt_functional.state as state_module

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to pretend they are 2 nodes")
    cpu0, cpu1 = sorted(os.sched_getaffinity(0))[:2]
    monkeypatch.setattr(state_module, "numa_nodes", lambda: [(cpu0,), (cpu1,)])
    K = ktf()
    prob = make_problem(**CASES["aligned"], seed=340)
    before = _threads_pinned_to(str(cpu0)), _threads_pinned_to(str(cpu1))
    state = K.MoEState(make_weights(prob), make_lora(prob), threads=2, numa=True)
    assert len(state.partition_states()) == 2
    check_state(state, prob, where="[two pinned partitions]")  # a worker pins itself before its first job
    assert (_threads_pinned_to(str(cpu0)), _threads_pinned_to(str(cpu1))) == (before[0] + 1, before[1] + 1)
