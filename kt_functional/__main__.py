"""The main job: LoRA fine-tuning of a small Qwen3-MoE whose routed experts run in kt-functional.

Builds a Qwen3-MoE from a config (random weights, bf16, byte-level vocabulary: no download),
patches it (experts packed into CPU memory, LoRA on every expert), fine-tunes it with AdamW on
the text shipped with the package, times the same training step on the unpatched torch model
carrying the same LoRA, and saves the adapter in PEFT's format.

    python -m kt_functional [--steps 40] [--layers 4] [--experts 32] [--threads N] [--out DIR]
                            [--storage {bf16,int8,fp8_block,int4_group,mxfp4}]

--storage quantizes the frozen experts as they are packed (int8, block-FP8, group-32 int4, MXFP4):
the LoRA trains on top of the quantized base weights.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import kt_functional as ktf
from kt_functional import hf
from kt_functional.quant import STORAGES

CORPUS = os.path.join(os.path.dirname(__file__), "demo_corpus.txt")


def _batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


def _step(model, opt, ids) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.item()


def _optimizer(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def _progress(step: int, steps: int, loss: float, tps: float, tty: bool) -> None:
    width = 30
    done = width * step // steps
    line = f"[{'#' * done}{'.' * (width - done)}] step {step:3d}/{steps}  loss {loss:6.3f}  {tps:8,.0f} tokens/s"
    if tty:
        print("\r" + line, end="" if step < steps else "\n", flush=True)
    elif step == 1 or step % 5 == 0 or step == steps:
        print(line, flush=True)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kt_functional", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=384, help="expert intermediate size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--peer-steps", type=int, default=4, help="timed steps of the unpatched torch model")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--out", default="kt-demo-adapter", help="where the adapter is saved")
    p.add_argument("--storage", choices=STORAGES, default="bf16", help="storage format of the frozen experts")
    args = p.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    info = ktf.cpu_info()
    print(f"kt-functional {ktf.__version__}: ISA path {info['isa']} (runnable: {', '.join(ktf.available_isas())}), "
          f"{threads} threads")

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.intermediate, num_experts=args.experts, num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
        max_position_embeddings=max(args.seq, 512), tie_word_embeddings=False,
    )
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
    expert_bytes = sum(p.nbytes for n, p in base.named_parameters() if ".experts." in n)
    total_bytes = sum(p.nbytes for p in base.parameters())
    print(f"model: Qwen3-MoE, {args.layers} layers, {args.experts} experts (top-{args.top_k}), H={args.hidden}, "
          f"I={args.intermediate}: {total_bytes / 2**20:.0f} MiB bf16, routed experts {expert_bytes / 2**20:.0f} MiB")

    t0 = time.perf_counter()
    model = hf.patch_model(copy.deepcopy(base), lora_rank=args.rank, lora_alpha=args.alpha, threads=threads,
                           storage=args.storage)
    packed = sum(kt.weights.nbytes for _, kt in hf.kt_layers(model))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"patched in {time.perf_counter() - t0:.1f} s: experts packed for forward and backward as {args.storage} "
          f"({packed / 2**20:.0f} MiB), {lora_params:,} LoRA parameters (r={args.rank}) on every expert")

    with open(CORPUS, "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)
    tokens = args.batch * args.seq
    print(f"fine-tuning on {os.path.basename(CORPUS)} ({len(data):,} bytes, byte-level tokens), "
          f"{tokens:,} tokens per step, AdamW lr {args.lr}")

    opt = _optimizer(model, args.lr)
    batches = _batches(data, args.batch, args.seq, seed=1)
    tty = sys.stdout.isatty()
    losses, times = [], []
    for step in range(1, args.steps + 1):
        ids = next(batches)
        t = time.perf_counter()
        losses.append(_step(model, opt, ids))
        times.append(time.perf_counter() - t)
        _progress(step, args.steps, losses[-1], tokens / times[-1], tty)
    first, last = sum(losses[:5]) / min(5, len(losses)), sum(losses[-5:]) / min(5, len(losses))
    print(f"loss: {first:.3f} (mean of the first 5 steps) -> {last:.3f} (last 5); "
          f"a uniform guess over 256 bytes is {torch.log(torch.tensor(256.0)):.3f}")

    # The peer: the unpatched model carrying the same LoRA in plain torch, same batches, same optimizer.
    twin = hf.torch_lora_twin(base, model, impl="grouped_mm")
    twin_opt = _optimizer(twin, args.lr)
    peer_batches = _batches(data, args.batch, args.seq, seed=2)
    peer_times = []
    for _ in range(args.peer_steps + 1):  # the first step warms up
        t = time.perf_counter()
        _step(twin, twin_opt, next(peer_batches))
        peer_times.append(time.perf_counter() - t)
    ours = _median(times[2:] or times)
    theirs = _median(peer_times[1:] or peer_times)
    print(f"training step (median): kt-functional {ours * 1e3:,.0f} ms = {tokens / ours:,.0f} tokens/s; "
          f"unpatched torch model + the same LoRA (grouped_mm experts) {theirs * 1e3:,.0f} ms = "
          f"{tokens / theirs:,.0f} tokens/s; speed-up {theirs / ours:.2f}x")

    hf.save_adapter(model, args.out)
    reloaded = hf.load_adapter(hf.patch_model(copy.deepcopy(base), lora_rank=args.rank, threads=threads,
                                              storage=args.storage), args.out)
    probe = next(batches)[:1, :64]
    with torch.no_grad():
        same = torch.equal(model.eval()(probe).logits, reloaded.eval()(probe).logits)
    print(f"adapter saved to {args.out}/ (PEFT format: adapter_config.json + adapter_model.safetensors); "
          f"reloaded into a fresh patched model: logits {'identical' if same else 'DIFFER'}")
    return 0 if same and last < first else 1


if __name__ == "__main__":
    sys.exit(main())
