"""Multi-process LoRA fine-tuning: one rank owns the routed experts, every rank sends it its tokens.

Run it on CPU (gloo) with 2 processes (about 20 s on 2 cores):

    torchrun --nproc-per-node 2 examples/train_distributed.py
    python -m torch.distributed.run --nproc-per-node 2 examples/train_distributed.py --checkpointing --out /tmp/kt-dist

What it shows
-------------
1. Every rank builds the same tiny Qwen3-MoE (random weights, seeded; on a real job: each GPU rank
   its model with the experts on the meta device, and patch_model(..., checkpoint=DIR)).
2. ``hf.patch_model(model, owner_rank=0, lora_grad_reduction="mean")``: rank 0 alone packs the experts
   and holds their LoRA; the other ranks keep no expert weights and no expert parameters. Every MoE
   block sends its tokens to rank 0, which runs one forward (and backward) for all ranks.
3. DDP over the other trainable parameters (the routers): the owner's LoRA is left out of DDP
   (patch_model tells DDP to ignore it); "mean" divides the LoRA gradients, which cover every rank's
   tokens, by the number of ranks, as DDP averages the routers' gradients.
4. Gradient accumulation and, with --checkpointing, non-reentrant activation checkpointing.
5. ``hf.save_adapter`` on every rank (collective): rank 0 writes the PEFT adapter.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kt_functional import hf

TEXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md"))


def build_model(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_experts=16, num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=False)
    torch.manual_seed(seed)  # the same base weights on every rank
    return AutoModelForCausalLM.from_config(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument("--out", default=None, help="adapter output dir (default: a temporary dir)")
    args = p.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    model = build_model(seed=0)
    hf.patch_model(model, lora_rank=8, lora_alpha=16, owner_rank=0,
                   lora_grad_reduction="mean")
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.requires_grad_(True)  # the routers: trained with DDP
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".kt_experts." in n)
    print(f"rank {rank}: {expert_params} expert LoRA parameters, "
          f"{sum(kt.weights.nbytes for _, kt in hf.kt_layers(model)) / 2**20:.1f} MiB of packed experts", flush=True)
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    with open(TEXT, "rb") as f:
        tokens = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(1 + rank)  # every rank its own data
    for step in range(args.steps):
        total = 0.0
        for _ in range(args.accum):
            seq = args.seq_len + 8 * rank  # ranks may send different numbers of tokens
            start = int(torch.randint(0, len(tokens) - seq - 1, (1,), generator=gen))
            window = tokens[start:start + seq + 1][None]
            loss = ddp(input_ids=window, labels=window).loss / args.accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"rank {rank} step {step + 1}/{args.steps}: loss {total:.4f}", flush=True)

    out = args.out or os.path.join(tempfile.gettempdir(), "kt-distributed-adapter")
    hf.save_adapter(model, out)  # collective: rank 0 writes, every rank returns once it is written
    if rank == 0:
        print(f"adapter written to {out}: {sorted(os.listdir(out))}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
