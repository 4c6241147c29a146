"""Multi-process and partitioned expert layers on the Qwen3-30B-A3B layer (E=128 H=2048 I=768 k=8, LoRA r=16).

    python bench/bench_distributed.py                 # about 2 minutes on 2 cores, ~9 GiB of RAM at its peak
    KT_BENCH_SMOKE=1 python bench/bench_distributed.py   # tiny shapes: checks the script in seconds

Measures the median wall time of one fwd+bwd (ktf.moe_forward + ktf.moe_backward, all threads) of:
  1. one process, T=1024 (the baseline);
  2. two gloo processes on 127.0.0.1, T=512 each, through the owner (this process is rank 0, the owner; it
     starts rank 1): kt_functional.distributed.moe_forward / moe_backward, timed on the owner from a
     barrier to the end of its backward; target: within 15% of (1);
  3. one process, T=1024, MoEState(partitions=2) (on a one-node machine: the cost of partitioning).
The rounds interleave the three (rank 1 waits while the owner times 1 and 3). Prints a table; --json PATH
also writes the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import kt_functional as ktf
from kt_functional import distributed

SMOKE = os.environ.get("KT_BENCH_SMOKE", "") not in ("", "0")
E, H, I, K, R = (16, 256, 96, 4, 8) if SMOKE else (128, 2048, 768, 8, 16)
T = 64 if SMOKE else 1024
RANKS = 2
ROUNDS, WARMUP = (3, 1) if SMOKE else (5, 1)
TARGET = 1.15


def tokens(seed: int = 0):
    """x, ids, w, gy of the whole batch (T tokens; rank r of the distributed run takes its T / RANKS rows)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).bfloat16()
    scores = torch.randn(T, E, generator=gen)
    ids = scores.topk(K, dim=-1).indices
    w = torch.softmax(scores.gather(1, ids), dim=-1)
    gy = (torch.randn(T, H, generator=gen) * 0.01).bfloat16()
    return x, ids, w, gy


def rows(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = T // RANKS
    return t[rank * n:(rank + 1) * n]


def layer(threads: int) -> tuple[ktf.ExpertWeights, ktf.LoRA]:
    gen = torch.Generator().manual_seed(1)
    gate = (torch.randn(E, I, H, generator=gen) * H ** -0.5).bfloat16()
    up = (torch.randn(E, I, H, generator=gen) * H ** -0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=gen) * I ** -0.5).bfloat16()
    weights = ktf.ExpertWeights.from_tensors(gate, up, down, threads=threads)
    lora = ktf.LoRA.init(weights, rank=R, alpha=2.0 * R, seed=2)
    for name in ("gate_b", "up_b", "down_b"):
        getattr(lora, name).normal_(0, 0.5 * R ** -0.5, generator=gen)
    return weights, lora


def fwd_bwd(state, x, ids, w, gy):
    def step():
        y, cache = ktf.moe_forward(state, x, ids, w)
        ktf.moe_backward(state, cache, gy)
    return step


def distributed_step(group, state, rank: int):
    x, ids, w, gy = (rows(t, rank) for t in tokens())

    def step():
        dist.barrier(group=group.group)  # every round starts together
        y, cache = distributed.moe_forward(state, x, ids, w, group=group)
        distributed.moe_backward(state, cache, gy, group=group)
    return step


def other_rank(rank: int, port: int) -> None:
    """Rank >= 1: no experts; sends its tokens to the owner every round (and waits while it times the others)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS,
                            timeout=datetime.timedelta(minutes=10))
    step = distributed_step(distributed.ExpertGroup.new(0), None, rank)
    for _ in range(WARMUP + ROUNDS):
        step()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        return other_rank(args.rank, args.port)

    threads = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    weights, lora = layer(threads)
    print(f"layer E={E} H={H} I={I} k={K} r={R}: packed {weights.nbytes / 2**30:.2f} GiB in "
          f"{time.perf_counter() - started:.1f} s; isa={ktf.cpu_info()['isa']}, {threads} threads", flush=True)
    x, ids, w, gy = tokens()
    state = ktf.MoEState(weights, lora, threads=threads)
    started = time.perf_counter()
    split = ktf.MoEState(weights, lora, threads=threads, partitions=2)
    print(f"partitions=2 packed in {time.perf_counter() - started:.1f} s", flush=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    others = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--port", str(port)])
              for r in range(1, RANKS)]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=RANKS,
                            timeout=datetime.timedelta(minutes=10))
    key = f"{RANKS} processes x T={T // RANKS} through the owner"
    steps = {f"one process, T={T}": fwd_bwd(state, x, ids, w, gy),
             key: distributed_step(distributed.ExpertGroup.new(0), state, 0),
             f"one process, T={T}, partitions=2": fwd_bwd(split, x, ids, w, gy)}
    # Rounds interleave the three, so a change in the machine's load hits them alike.
    times = {name: [] for name in steps}
    for round_ in range(WARMUP + ROUNDS):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= WARMUP:
                times[name].append(time.perf_counter() - start)
    dist.destroy_process_group()
    for p in others:
        p.wait(timeout=600)
    results = {name: 1e3 * statistics.median(t) for name, t in times.items()}

    base = results[f"one process, T={T}"]
    print(f"\n| fwd+bwd (median of {ROUNDS}) | ms | vs one process |\n|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.3f}x |")
    ratio = results[key] / base
    print(f"\ndistributed vs one process: {ratio:.3f}x (target <= {TARGET}x): {'PASS' if ratio <= TARGET else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": dict(E=E, H=H, I=I, k=K, r=R, T=T), "threads": threads, "ms": results,
                       "distributed_ratio": ratio, "target": TARGET}, f, indent=2)


if __name__ == "__main__":
    main()
