"""The layer demo: one Qwen3-30B-A3B-shaped MoE layer, forward and backward with LoRA, checked
against the fp32 reference on a sample of tokens and timed beside plain torch.

    python -m kt_functional.layer_demo [--tokens 1024] [--threads N] [--experts 128] [--check-tokens 32]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import kt_functional as ktf
from kt_functional import reference


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kt_functional.layer_demo", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens checked against the fp32 reference")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    threads = args.threads or torch.get_num_threads()
    E, H, I, k, r, T = args.experts, args.hidden, args.intermediate, args.top_k, args.rank, args.tokens
    info = ktf.cpu_info()
    print(f"kt-functional {ktf.__version__}: ISA path '{info['isa']}' (available: {', '.join(info['available_isas'])}), "
          f"{threads} threads")
    print(f"layer: E={E} H={H} I={I} top-{k}, LoRA r={r} on gate/up/down; {T} tokens")

    gate = (torch.randn(E, I, H) * H**-0.5).bfloat16()
    up = (torch.randn(E, I, H) * H**-0.5).bfloat16()
    down = (torch.randn(E, H, I) * I**-0.5).bfloat16()
    t0 = time.perf_counter()
    weights = ktf.ExpertWeights.from_tensors(gate, up, down, threads=threads)
    print(f"packed {weights.nbytes / 2**30:.2f} GiB of expert weights in {time.perf_counter() - t0:.1f} s")
    lora = ktf.LoRA.init(weights, rank=r, alpha=2.0 * r, seed=0)
    for b in (lora.gate_b, lora.up_b, lora.down_b):  # as after some training: every term non-zero
        b.normal_(0, 0.02)
    state = ktf.MoEState(weights, lora, threads=threads)

    x = torch.randn(T, H).bfloat16()
    scores = torch.randn(T, E)
    ids = scores.topk(k, dim=-1).indices
    w = torch.softmax(scores.gather(1, ids), dim=-1)
    gy = (torch.randn(T, H) * 0.01).bfloat16()

    def kt_step():
        y, cache = ktf.moe_forward(state, x, ids, w)
        return y, ktf.moe_backward(state, cache, gy)

    y, grads = kt_step()

    # Correctness on a sample of tokens: the layer is per-token, so a slice is an exact check.
    n = min(args.check_tokens, T)
    sample = torch.randperm(T)[:n]
    ref_kwargs = dict(gate=gate, up=up, down=down, lora=lora, scale=lora.scale)
    ref_y = reference.moe_reference(x[sample], ids[sample], w[sample], **ref_kwargs)
    ref_g = reference.moe_reference_grads(x[sample], ids[sample], w[sample], gy=gy[sample], **ref_kwargs)
    errs = {"y": reference.rel_err(y[sample], ref_y), "dx": reference.rel_err(grads.x[sample], ref_g["x"]),
            "dw": reference.rel_err(grads.w[sample], ref_g["w"])}
    # LoRA gradients sum over every token: compare the sample's own contribution.
    sub = ktf.moe_backward(state, ktf.moe_forward(state, x[sample], ids[sample], w[sample])[1], gy[sample])
    for name in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"):
        errs["d" + name] = reference.rel_err(getattr(sub.lora, name), ref_g[name])
    worst = max(errs.values())
    print(f"check vs fp32 reference on {n} tokens: max rel err {worst:.2e} (tolerance 1e-2): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))

    kt_s = _median_time(kt_step, args.repeat)

    peer_lora = {name: t.detach().clone().requires_grad_() for name, t in lora.tensors().items()}
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()

    def torch_step():
        out = reference.eager_loop_moe(xr, ids, wr, gate, up, down, lora=peer_lora, scale=lora.scale)
        out.backward(gy)

    torch_s = _median_time(torch_step, max(1, args.repeat - 1))
    print(f"forward+backward of {T} tokens (median): kt-functional {kt_s * 1e3:.0f} ms = {T / kt_s:,.0f} tokens/s; "
          f"torch eager per-expert loop {torch_s * 1e3:.0f} ms = {T / torch_s:,.0f} tokens/s; "
          f"speed-up {torch_s / kt_s:.1f}x")
    if worst > 1e-2:
        print("FAILED: kt-functional disagrees with the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
