"""kt_functional.distributed: 2 and 3 gloo processes on this machine (tests/dist_worker.py) against one process.

The owner computes every rank's tokens in one call; each rank's outputs must equal a single process's on that
rank's batch, and the owner's LoRA gradients the single-process gradients summed over the batches.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

import dist_worker as worker  # noqa: E402
from helpers import TOL, rel_err  # noqa: E402
from hf_models import TINY_CONFIGS, lora_grads  # noqa: E402

import kt_functional as ktf  # noqa: E402
from kt_functional import hf  # noqa: E402

HARD_TIMEOUT_S = 120  # all ranks of a spawn together: a hang fails the test instead of the CI job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario: str, world: int, tmp_path, dist_timeout_s: float = 60) -> list[subprocess.CompletedProcess]:
    """Runs one process per rank; returns their results (killed, and the test failed, past HARD_TIMEOUT_S)."""
    port = _free_port()
    env = {**os.environ, "KT_TEST_DIST_TIMEOUT": str(dist_timeout_s), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, worker.__file__, scenario, str(r), str(world), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    results = []
    deadline = time.monotonic() + HARD_TIMEOUT_S
    try:
        for r, p in enumerate(procs):
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{scenario}: rank {r} still running after {HARD_TIMEOUT_S} s (a hang)")
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _outputs(results, tmp_path) -> list[dict]:
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} failed:\n{res.stderr[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(results))]


def _close(out, ref) -> bool:
    return out.shape == ref.shape and (ref.numel() == 0 or rel_err(out.float(), ref.float()) <= TOL)


@pytest.mark.parametrize("world", [2, 3])
def test_functional_owner_without_tokens(tmp_path, world):
    outs = _outputs(_spawn("functional", world, tmp_path), tmp_path)
    state = worker.functional_state()
    summed = None
    for rank, out in enumerate(outs):
        x, ids, w, gy = worker.functional_inputs(rank)
        assert out["y"].shape == (worker.FUNCTIONAL_T[rank], worker.H)
        if not len(x):
            assert out["dx"].shape == x.shape and out["dw"].shape == w.shape
            continue
        y, cache = ktf.moe_forward(state, x, ids, w)
        grads = ktf.moe_backward(state, cache, gy)
        assert out["y"].dtype == torch.bfloat16 and out["dw"].dtype == w.dtype
        mixed = x.float() if rank == len(outs) - 1 else x
        assert out["y_mixed"].dtype == mixed.dtype and _close(out["y_mixed"], y)
        assert _close(out["y"], y) and _close(out["dx"], grads.x) and _close(out["dw"], grads.w)
        lora = {name: getattr(grads.lora, name) for name in out_lora_names(outs)}
        summed = lora if summed is None else {n: summed[n] + lora[n] for n in lora}
    assert all(out["autograd_equal"] for out in outs)  # the autograd Function gives the functional results
    owner = outs[worker.FUNCTIONAL_OWNER]
    assert all("lora" not in out for r, out in enumerate(outs) if r != worker.FUNCTIONAL_OWNER)
    for name, ref in summed.items():
        assert _close(owner["lora"][name], ref), name
    # Invalid input on one rank raises on every rank, and the group stays usable (the calls above ran after it).
    ids_error = ("ValueError: ids: expert ids must be in [-1, 6) (-1 = unused slot); rank: (min, max) = "
                 f"{{{worker.bad_ids_rank(world)}: (-1, 6)}}")
    assert [out["bad_ids_error"] for out in outs] == [ids_error] * world
    assert outs[0]["bad_dtype_error"] == "TypeError: x: expected dtype bfloat16 or float32, got int32"
    for out in outs[1:]:
        assert out["bad_dtype_error"].startswith("RuntimeError: kt_functional.distributed: the inputs of rank(s) [0]")
    consumed = "ValueError: cache: already consumed by a moe_backward; each forward's cache can be used once"
    assert [out["reused_cache_error"] for out in outs] == [consumed] * world


def out_lora_names(outs) -> list[str]:
    return list(outs[worker.FUNCTIONAL_OWNER]["lora"])


def _single_process_training(world: int):
    """The hf scenario's training in one process: each step sees every rank's micro-batches; the loss is the
    mean over ranks (DDP averages the routers' gradients; lora_grad_reduction='mean' the LoRA's)."""
    model = worker.hf_model()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=worker.LR)
    losses = [[0.0] * worker.HF_STEPS for _ in range(world)]
    for step in range(worker.HF_STEPS):
        for micro in range(worker.HF_MICRO):
            for rank in range(world):
                tokens = worker.hf_tokens(rank, step, micro)
                loss = model(input_ids=tokens, labels=tokens).loss
                (loss / world).backward()
                losses[rank][step] += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def test_hf_three_ranks_ddp_checkpointing_accumulation_adapter(tmp_path):
    world = 3
    outs = _outputs(_spawn("hf", world, tmp_path), tmp_path)
    owner = outs[0]
    assert owner["num_lora_params"] > 0 and all(out["num_lora_params"] == 0 for out in outs[1:])
    assert owner["expert_bytes"] > 0 and all(out["expert_bytes"] == 0 for out in outs[1:])
    assert all(out["torch_expert_tensors"] == [] for out in outs)  # the torch copies were freed everywhere
    layers = TINY_CONFIGS["qwen3_moe"]["num_hidden_layers"]
    assert [out["caches_kept"] for out in outs] == [layers] * world
    assert [out["caches_kept_by_checkpointing"] for out in outs] == [0] * world

    single = worker.hf_model()
    summed = None
    for rank, out in enumerate(outs):
        single.zero_grad(set_to_none=True)
        logits, embed_grad, _ = worker.embeds_and_grads(single, worker.hf_tokens(rank))
        assert _close(out["logits"], logits), rank
        assert _close(out["embed_grad"], embed_grad), rank
        grads = lora_grads(single)
        summed = grads if summed is None else {k: summed[k] + grads[k] for k in grads}
    for key, ref in summed.items():  # 'mean' over the ranks: world times the owner's gradient is the sum
        assert _close(world * owner["lora_grads"][key], ref), key

    losses = _single_process_training(world)
    for rank, out in enumerate(outs):
        assert len(out["losses"]) == worker.HF_STEPS
        for step, (got, ref) in enumerate(zip(out["losses"], losses[rank])):
            assert abs(got - ref) <= TOL * abs(ref), (rank, step, got, ref)
    # DDP kept the routers' replicas identical. (Not compared with the single process's: AdamW's first steps
    # move every weight by about lr whatever its gradient's size, so rounding-level differences of near-zero
    # gradients flip some updates' signs; the losses above are the comparison the training allows.)
    for out in outs[1:]:
        for name, p in out["router"].items():
            assert torch.equal(p, owner["router"][name]), name

    # The collective save_adapter writes the single-process adapter, byte for byte (same LoRA before training);
    # after training, load_adapter (collective) restored the owner's LoRA from what it wrote.
    single_dir = tmp_path / "single"
    hf.save_adapter(worker.hf_model(), single_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter_before_training" / name).read_bytes() == (single_dir / name).read_bytes(), name
    assert owner["adapter_written"] and all(out["reloaded_equal"] for out in outs)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    results = _spawn("failure", 2, tmp_path, dist_timeout_s=15)
    assert results[1].returncode != 0 and "rank 1 fails before its forward" in results[1].stderr
    assert results[0].returncode != 0
    assert "kt_functional.distributed: rank 0 of 2 (owner: rank 0)" in results[0].stderr, results[0].stderr[-3000:]


def test_a_stalled_rank_times_out(tmp_path):
    timeout_s = 5
    owner, _ = _outputs(_spawn("stall", 2, tmp_path, dist_timeout_s=timeout_s), tmp_path)
    assert owner["error"].startswith("kt_functional.distributed: rank 0 of 2 (owner: rank 0): exchanging the token "
                                     "counts of an expert layer forward failed"), owner["error"]
    assert timeout_s - 1 <= owner["waited_s"] <= timeout_s + 10


def test_owner_rank_without_torch_distributed_patches_locally():
    from hf_models import build

    from kt_functional import distributed

    model = hf.patch_model(build("qwen3_moe"), lora_rank=4, threads=1, owner_rank=0, lora_grad_reduction="mean")
    assert distributed.group_of(model) is None
    assert hf.kt_layers(model) and not any(isinstance(kt, distributed.OwnerExperts) for _, kt in hf.kt_layers(model))
    with pytest.raises(ValueError, match="lora_grad_reduction: expected one of"):
        hf.patch_model(build("qwen3_moe"), owner_rank=0, lora_grad_reduction="average")
    with pytest.raises(TypeError, match="owner_rank: expected a rank"):
        hf.patch_model(build("qwen3_moe"), owner_rank="0")
    with pytest.raises(TypeError, match="group: expected an ExpertGroup"):
        distributed.moe_forward(None, torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                                group=None)
