"""The storage formats against bf16 on the Qwen3-30B-A3B layer (E=128 H=2048 I=768 k=8, LoRA r=16), interleaved.

    python bench/bench_storage.py --json bench/storage_interleaved.json   # about 1 minute on 2 cores, ~5 GiB of RAM
    KT_BENCH_SMOKE=1 python bench/bench_storage.py            # tiny shapes: checks the script in seconds

The same comparisons as test_storage / test_storage_base in the pytest-benchmark suite, but each round
times every storage one after another, so that all of them see the same machine: on a shared VM the
memory bandwidth drifts by up to 2x over minutes, and a memory-bound bf16 case timed minutes apart from
a compute-bound quantized one gives a ratio of that drift, not of the formats. Cases (median of the
rounds, each call after one untimed call):
  - T=16 forward with LoRA and without (the base layer alone); target: >= 1.7x bf16's speed for int8
    and fp8_block, >= 2.8x for int4_group and mxfp4;
  - T=1024 fwd+bwd with LoRA; target: <= 1.15x bf16's time.
Prints a table; --json PATH also writes the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

import kt_functional as ktf
from kt_functional import reference

SMOKE = os.environ.get("KT_BENCH_SMOKE", "") not in ("", "0")
E, H, I, K, R = (16, 256, 96, 4, 8) if SMOKE else (128, 2048, 768, 8, 16)
T_DECODE, T_TRAIN = (4, 64) if SMOKE else (16, 1024)
ROUNDS = {"forward": 3 if SMOKE else 21, "fwd+bwd": 3 if SMOKE else 7}
STORAGES = ("bf16", "int8", "fp8_block", "int4_group", "mxfp4")
SPEEDUP_T16 = {"int8": 1.7, "fp8_block": 1.7, "int4_group": 2.8, "mxfp4": 2.8}
SLOWDOWN_T1024 = 1.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    prob = reference.make_problem(E=E, H=H, I=I, k=K, T=T_TRAIN, r=R, seed=0)
    del prob.gate_up  # a second copy of gate/up not needed here
    lora = ktf.LoRA(**prob.lora, alpha=prob.alpha)
    states, nbytes = {}, {}
    for storage in STORAGES:
        weights = ktf.ExpertWeights.from_tensors(prob.gate, prob.up, prob.down, storage=storage)
        nbytes[storage] = weights.nbytes
        states[storage] = (ktf.MoEState(weights, lora), ktf.MoEState(weights, None))
    gy = (torch.randn(T_TRAIN, H, generator=torch.Generator().manual_seed(1)) * 0.01).bfloat16()
    x16, ids16, w16 = prob.x[:T_DECODE], prob.ids[:T_DECODE], prob.w[:T_DECODE]

    def forward(state):
        return lambda: ktf.moe_forward(state, x16, ids16, w16)

    def fwd_bwd(state):
        def step():
            _, cache = ktf.moe_forward(state, prob.x, prob.ids, prob.w)
            ktf.moe_backward(state, cache, gy)
        return step

    cases = {
        f"T={T_DECODE} forward": {s: forward(states[s][0]) for s in STORAGES},
        f"T={T_DECODE} forward, no LoRA": {s: forward(states[s][1]) for s in STORAGES},
        f"T={T_TRAIN} fwd+bwd": {s: fwd_bwd(states[s][0]) for s in STORAGES},
    }
    medians = {}
    for case, steps in cases.items():
        times = {s: [] for s in STORAGES}
        for _ in range(ROUNDS[case.split(",")[0].split()[1]]):
            for storage, step in steps.items():
                step()  # untimed: the same call before, so each timed call starts from the same state
                t0 = time.perf_counter()
                step()
                times[storage].append(time.perf_counter() - t0)
        medians[case] = {s: statistics.median(t) for s, t in times.items()}

    rows = []
    for case, med in medians.items():
        for storage in STORAGES[1:]:
            ratio = med["bf16"] / med[storage]
            if case.startswith(f"T={T_DECODE} "):
                goal = SPEEDUP_T16[storage]
                target, met = f">= {goal}x bf16's speed", ratio >= goal
                measured = f"{ratio:.2f}x"
            else:
                target, met = f"<= {SLOWDOWN_T1024}x bf16's time", 1 / ratio <= SLOWDOWN_T1024
                measured = f"{1 / ratio:.3f}x bf16's time"
            rows.append({"case": case, "storage": storage, "ms": med[storage] * 1e3, "bf16_ms": med["bf16"] * 1e3,
                         "speedup": ratio, "measured": measured, "target": target, "met": met,
                         "bytes_vs_bf16": nbytes[storage] / nbytes["bf16"]})

    isa, threads = ktf.cpu_info()["isa"], states["bf16"][0].threads
    print(f"kt_functional storage bench: isa={isa}, {threads} threads; "
          f"E={E} H={H} I={I} k={K} r={R}; rounds interleaved over the storages")
    print("| case | storage | ms | bf16 ms | measured | bytes vs bf16 | target | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['storage']} | {r['ms']:.1f} | {r['bf16_ms']:.1f} | {r['measured']} | "
              f"{r['bytes_vs_bf16']:.3f} | {r['target']} | {'met' if r['met'] else 'MISSED'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": SMOKE,
                       "isa": isa, "threads": threads,
                       "shape": {"E": E, "H": H, "I": I, "k": K, "r": R}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
