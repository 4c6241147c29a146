"""One rank of the multi-process tests (tests/test_distributed.py starts one process per rank).

    python tests/dist_worker.py SCENARIO RANK WORLD PORT OUT_DIR

Each scenario writes what the parent compares with single-process runs to OUT_DIR/rank<RANK>.pt.
The inputs of every scenario come from the functions below, which the parent calls too.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_models import batch, build, lora_grads, randomize_lora_b  # noqa: E402

import kt_functional as ktf  # noqa: E402
from kt_functional import distributed, hf  # noqa: E402
from kt_functional.reference import LORA_KEYS  # noqa: E402

# functional scenario: the owner is rank 1, which has no tokens; every rank's T differs (W ranks: the first W)
FUNCTIONAL_OWNER = 1
FUNCTIONAL_T = (5, 0, 7)
E, H, I, K, R = 6, 40, 24, 3, 4

# hf scenario
HF_SEQ = (9, 14, 5)  # tokens of rank r (batch size 1); a run with W ranks uses the first W
HF_STEPS, HF_MICRO = 10, 2
LR = 1e-2


def bad_ids_rank(world: int) -> int:
    """The rank whose ids get an out-of-range expert in the functional scenario (the last one with tokens)."""
    return max(r for r in range(world) if FUNCTIONAL_T[r])


def functional_state() -> ktf.MoEState:
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(E, I, H, generator=gen).bfloat16() for _ in range(2))
    down = torch.randn(E, H, I, generator=gen).bfloat16()
    weights = ktf.ExpertWeights.from_tensors(gate, up, down, threads=1)
    lora = ktf.LoRA.init(weights, rank=R, alpha=8.0, seed=1)
    for name in ("gate_b", "up_b", "down_b"):
        getattr(lora, name).normal_(0, 0.05, generator=gen)
    return ktf.MoEState(weights, lora, threads=1)


def functional_inputs(rank: int):
    """x, ids (with -1 slots), w, gy of a rank."""
    T = FUNCTIONAL_T[rank]
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(T, H, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    ids = ids.long()
    if T:
        ids[0, -1] = -1
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    gy = torch.randn(T, H, generator=gen)
    return x, ids, w, gy


def hf_model(**patch):
    """The tiny Qwen3-MoE of the hf scenario, patched, routers trainable."""
    model = build("qwen3_moe")
    hf.patch_model(model, lora_rank=4, lora_alpha=8, threads=1, **patch)
    randomize_lora_b(model)  # on the owner (a non-owner has no LoRA)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.requires_grad_(True)
    return model


def hf_tokens(rank: int, step: int | None = None, micro: int = 0) -> torch.Tensor:
    seed = rank if step is None else 1000 + 100 * step + 10 * rank + micro
    return batch(seed=seed, batch_size=1, seq=HF_SEQ[rank])


def embeds_and_grads(model, tokens):
    """(logits, d loss / d input embeddings, distributed expert caches alive between forward and backward)."""
    emb = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=tokens)
    caches_kept = len(distributed._HOLDERS)
    out.loss.backward()
    return out.logits.detach(), emb.grad, caches_kept


def _functional(rank: int, world: int, out: dict) -> None:
    group = distributed.ExpertGroup.new(FUNCTIONAL_OWNER)
    state = functional_state() if group.is_owner else None
    x, ids, w, gy = functional_inputs(rank)
    # Invalid input on one rank: every rank raises, and the group stays usable.
    bad = ids.clone()
    if rank == bad_ids_rank(world):
        bad[0, 0] = E
    try:
        distributed.moe_forward(state, x, bad, w, group=group)
    except (RuntimeError, ValueError) as e:
        out["bad_ids_error"] = f"{type(e).__name__}: {e}"
    # A wrong dtype on rank 0 (a local check): its TypeError there, a pointer to rank 0 elsewhere.
    try:
        distributed.moe_forward(state, x.int() if rank == 0 else x, ids, w, group=group)
    except (RuntimeError, TypeError) as e:
        out["bad_dtype_error"] = f"{type(e).__name__}: {e}"
    y, cache = distributed.moe_forward(state, x, ids, w, group=group)
    grads = distributed.moe_backward(state, cache, gy, group=group)
    out.update(y=y, dx=grads.x, dw=grads.w)
    if grads.lora is not None:
        out["lora"] = {name: getattr(grads.lora, name) for name in LORA_KEYS}
    try:
        distributed.moe_backward(state, cache, gy, group=group)
    except (RuntimeError, ValueError) as e:
        out["reused_cache_error"] = f"{type(e).__name__}: {e}"
    # The autograd path (what OwnerExperts / RemoteExperts run): the same gradients, 0-token ranks included.
    xg = x.clone().requires_grad_(True)
    lora = [t.clone().requires_grad_(True) for t in state.lora.tensors().values()] if group.is_owner else []
    base = replace(state, lora=None) if group.is_owner else None
    alpha = state.lora.alpha if group.is_owner else 0.0
    y_autograd = distributed.experts(group, xg, ids, w, base, lora, alpha)
    (y_autograd.float() * gy).sum().backward()
    out["autograd_equal"] = torch.equal(y_autograd, out["y"]) and torch.equal(xg.grad, out["dx"]) and all(
        torch.equal(t.grad, out["lora"][name]) for t, name in zip(lora, LORA_KEYS))
    # The last rank sends fp32 x (the owner then computes in fp32); every rank gets y in its x's dtype.
    mixed = x.float() if rank == world - 1 else x
    out["y_mixed"], _ = distributed.moe_forward(state, mixed, ids, w, group=group, save_for_backward=False)


def _hf(rank: int, world: int, out: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = hf_model(owner_rank=0, lora_grad_reduction="mean")
    out["num_lora_params"] = sum(1 for n, _ in model.named_parameters() if ".kt_experts." in n)
    out["expert_bytes"] = sum(kt.weights.nbytes for _, kt in hf.kt_layers(model))
    out["torch_expert_tensors"] = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]
                                   if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    out["logits"], out["embed_grad"], out["caches_kept"] = embeds_and_grads(model, hf_tokens(rank))
    if rank == 0:
        out["lora_grads"] = lora_grads(model)

    # The collective save_adapter before training writes what a single process with the same LoRA writes.
    hf.save_adapter(model, os.path.join(os.environ["KT_TEST_OUT"], "adapter_before_training"))

    # Training: DDP over the routers, non-reentrant checkpointing, HF_MICRO micro-batches per step.
    model.zero_grad(set_to_none=True)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(HF_STEPS):
        total = 0.0
        for micro in range(HF_MICRO):
            tokens = hf_tokens(rank, step, micro)
            loss = ddp(input_ids=tokens, labels=tokens).loss
            if step == micro == 0:  # checkpointing keeps no expert cache between the forward and the backward
                out["caches_kept_by_checkpointing"] = len(distributed._HOLDERS)
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    out["losses"] = losses
    out["router"] = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}

    model.eval()
    adapter = os.path.join(os.environ["KT_TEST_OUT"], "adapter")
    hf.save_adapter(model, adapter)
    out["adapter_written"] = os.path.exists(os.path.join(adapter, "adapter_model.safetensors"))
    with torch.no_grad():
        before = model(hf_tokens(rank)).logits
        for _, kt in hf.kt_layers(model):  # the owner's LoRA changes; load_adapter must restore it
            kt.down_b.data.zero_()
        hf.load_adapter(model, adapter)
        out["reloaded_equal"] = torch.equal(model(hf_tokens(rank)).logits, before)


def _failure(rank: int, world: int, out: dict) -> None:
    """Rank 1 raises and exits before its forward: rank 0's forward fails at once, naming the cause."""
    model = hf_model(owner_rank=0)
    if rank == 1:
        raise RuntimeError("rank 1 fails before its forward")
    model(hf_tokens(rank))


def _stall(rank: int, world: int, out: dict) -> None:
    """Rank 1 stays alive but never calls the expert layer: rank 0 fails after the group's timeout."""
    group = distributed.ExpertGroup.new(0)
    if rank == 1:  # alive until rank 0 has written its result (at most a while past the timeout)
        deadline = time.monotonic() + float(os.environ["KT_TEST_DIST_TIMEOUT"]) + 30
        while not os.path.exists(os.path.join(os.environ["KT_TEST_OUT"], "rank0.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        return
    x, ids, w, _ = functional_inputs(0)
    started = time.monotonic()
    try:
        distributed.moe_forward(functional_state(), x, ids, w, group=group)
    except distributed.ExchangeError as e:
        out["error"], out["waited_s"] = str(e), time.monotonic() - started


SCENARIOS = {"functional": _functional, "hf": _hf, "failure": _failure, "stall": _stall}


def main() -> None:
    scenario, rank, world, port, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    os.environ["KT_TEST_OUT"] = out_dir
    timeout = datetime.timedelta(seconds=float(os.environ.get("KT_TEST_DIST_TIMEOUT", "60")))
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timeout)
    out: dict = {}
    SCENARIOS[scenario](rank, world, out)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
