"""Research with the functional API only (no nn.Module): one MoE expert layer trained through LoRA.

What it shows
-------------
1. Random bf16 experts for one MoE layer (Qwen3-30B-A3B-like, scaled down so that it runs in
   seconds on 2 cores), packed once with ``ExpertWeights.from_tensors``.
2. A LoRA on every expert (``LoRA.init``, PEFT's init, then small random B so that every term
   of the layer is live), held in a ``MoEState``.
3. A router in plain torch (softmax over the expert logits, top-k, renormalised as Qwen3 does),
   trained by torch autograd from the ``dL/dw`` that ``moe_backward`` returns.
4. A tiny training loop: ``moe_forward`` -> MSE loss against a fixed target -> ``moe_backward``
   -> a hand-written Adam step on the LoRA tensors (in place) and on the router.
5. ``moe_forward_async``: the expert layer runs on the library's worker threads, GIL released,
   while the Python thread does other torch work (here: a stand-in "attention" matmul).
6. A check against the independent fp32 torch reference ``kt_functional.reference``.

Run it (about 10-20 s on 2 cores with the defaults):

    python examples/research_functional.py
    python examples/research_functional.py --experts 128 --hidden 2048 --intermediate 768 --top-k 8 --tokens 1024

About state and caches
----------------------
``ExpertWeights``, ``LoRA`` and ``MoEState`` are *frozen* dataclasses: their fields are never
reassigned, and the library functions never mutate their inputs. The LoRA *tensors* inside a
``LoRA`` are ordinary torch tensors, though, and the kernels read them at every call: updating
them in place (``p.add_(...)``, ``optimizer.step()``) is how one trains, with no sync step.
Updating them between a forward and its backward is refused (as torch autograd does).

``moe_forward(..., save_for_backward=True)`` returns ``(y, cache)``. The cache is an opaque
handle to that one forward's residuals (sized by its T). It is *consumed* by exactly one
``moe_backward``; a second use, or use with another ``MoEState``, raises ``ValueError``. Any
number of caches may be alive at once (gradient accumulation, pipelining); each is freed when
consumed or garbage-collected.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import kt_functional as ktf
from kt_functional import ops, reference


def make_router(H: int, E: int, seed: int) -> torch.Tensor:
    """Router weight [E, H] (fp32), trainable by torch autograd."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(E, H, generator=gen) * H**-0.5).requires_grad_(True)


def route(x: torch.Tensor, router: torch.Tensor, k: int):
    """Qwen3-style routing in plain torch: softmax over all experts, top-k, renormalise.

    Returns ids [T, k] (int64, no grad) and w [T, k] (fp32, differentiable w.r.t. router).
    """
    probs = torch.softmax(x.float() @ router.T, dim=-1)
    top, ids = probs.topk(k, dim=-1)
    w = top / top.sum(dim=-1, keepdim=True)
    return ids, w


class Adam:
    """A hand-written Adam over a dict of tensors, updated in place (the script's own update)."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for n, p in self.params.items():
            g = grads[n].float()
            self.m[n].mul_(b1).add_(g, alpha=1 - b1)
            self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
            update = (self.m[n] / c1) / ((self.v[n] / c2).sqrt_().add_(self.eps))
            p.add_(update.to(p.dtype), alpha=-self.lr)  # in place: the next moe_forward sees it


def main() -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=32, help="E (Qwen3-30B-A3B: 128)")
    p.add_argument("--hidden", type=int, default=1024, help="H (Qwen3-30B-A3B: 2048)")
    p.add_argument("--intermediate", type=int, default=384, help="I (Qwen3-30B-A3B: 768)")
    p.add_argument("--top-k", type=int, default=4, help="k (Qwen3-30B-A3B: 8)")
    p.add_argument("--tokens", type=int, default=256, help="T, tokens per step")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--router-lr", type=float, default=1e-4,
                   help="router learning rate (Adam moves every one of its H inputs per logit: keep it small)")
    p.add_argument("--no-train-router", action="store_true", help="keep the router frozen")
    p.add_argument("--threads", type=int, default=None, help="library worker threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    E, H, I, k, T, r = args.experts, args.hidden, args.intermediate, args.top_k, args.tokens, args.rank
    threads = args.threads or torch.get_num_threads()
    info = ktf.cpu_info()
    print(f"kt-functional {ktf.__version__}: ISA '{info['isa']}' (available {info['available_isas']}), "
          f"{threads} threads")
    print(f"layer: E={E} H={H} I={I} top-{k}, LoRA r={r} alpha={args.alpha}, T={T} tokens/step")

    # ---- 1. frozen experts, packed once --------------------------------------------------------------------
    # Scales as in a trained model: every intermediate is O(1).
    gate = (torch.randn(E, I, H) * H**-0.5).bfloat16()
    up = (torch.randn(E, I, H) * H**-0.5).bfloat16()
    down = (torch.randn(E, H, I) * I**-0.5).bfloat16()
    t0 = time.perf_counter()
    weights = ktf.ExpertWeights.from_tensors(gate, up, down, threads=threads)
    print(f"packed {weights.nbytes / 2**20:.1f} MiB of experts in {time.perf_counter() - t0:.2f} s "
          "(gate/up/down could be dropped now; this script keeps them for the reference check)")

    # ---- 2. LoRA + state -------------------------------------------------------------------------------------
    # LoRA.init is PEFT's init (A ~ U(+-1/sqrt(fan_in)), B = 0); give B small random values as if
    # after some training, so every LoRA term and gradient is non-zero from step 0.
    lora = ktf.LoRA.init(weights, rank=r, alpha=args.alpha, seed=args.seed)
    with torch.no_grad():
        for b in (lora.gate_b, lora.up_b, lora.down_b):
            b.normal_(0.0, 0.02)
    # MoEState is a frozen dataclass: weights + LoRA + thread count + ISA path. It holds the LoRA
    # *tensors* by reference: in-place updates of them are seen by the next call.
    state = ktf.MoEState(weights, lora, threads=threads)
    # (Printing the state itself would print every LoRA tensor: the dataclasses' repr includes them.)
    print(f"state: E={weights.num_experts} H={weights.hidden_size} I={weights.intermediate_size}, "
          f"LoRA rank {lora.rank} scale {lora.scale:g} ({sum(t.numel() for t in lora.tensors().values()):,} "
          f"fp32 parameters), threads={state.threads}, isa={state.isa!r}")

    # ---- 3. data, router, target -----------------------------------------------------------------------------
    x = torch.randn(T, H).bfloat16()
    router = make_router(H, E, args.seed + 1)
    with torch.no_grad():  # a fixed target: what the layer gives now, plus a random shift to learn
        ids0, w0 = route(x, router, k)
        y0, _ = ktf.moe_forward(state, x, ids0, w0, save_for_backward=False)  # inference: no cache
        target = y0.float() + 0.5 * y0.float().std() * torch.randn(T, H)

    lora_params = lora.tensors()  # name -> the very tensors the kernels read
    opt = Adam(lora_params, lr=args.lr)
    router_opt = None if args.no_train_router else Adam({"router": router}, lr=args.router_lr)

    # ---- 4. training loop ------------------------------------------------------------------------------------
    # (step 0's "update" includes one-off warm-up: the first autograd backward through the router.)
    print(f"\n{'step':>4} {'loss':>10} {'route ms':>9} {'fwd ms':>8} {'bwd ms':>8} {'update ms':>9}")
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids, w = route(x, router, k)  # w carries the router's autograd graph
        t1 = time.perf_counter()
        # The library takes plain tensors: pass w detached; its gradient comes back as grads.w.
        y, cache = ktf.moe_forward(state, x, ids, w.detach())
        t2 = time.perf_counter()
        diff = y.float() - target
        loss = diff.pow(2).mean()
        gy = 2.0 * diff / diff.numel()  # dL/dy by hand: the library is not autograd
        grads = ktf.moe_backward(state, cache, gy)  # consumes the cache: a second use raises ValueError
        t3 = time.perf_counter()
        # grads.lora.* are fp32 gradients in the LoRA tensors' shapes; grads.x feeds the layer below;
        # grads.w is dL/dw and continues through the torch router by autograd.
        opt.step({n: getattr(grads.lora, n) for n in lora_params})
        if router_opt is not None:
            router.grad = None
            w.backward(grads.w)
            router_opt.step({"router": router.grad})
        t4 = time.perf_counter()
        print(f"{step:>4} {loss.item():>10.5f} {1e3 * (t1 - t0):>9.1f} {1e3 * (t2 - t1):>8.1f} "
              f"{1e3 * (t3 - t2):>8.1f} {1e3 * (t4 - t3):>9.1f}")
        if step == 0:
            try:
                ktf.moe_backward(state, cache, gy)
            except ValueError as e:
                print(f"     (reusing the consumed cache is refused: {e})")

    # The order matters: changing LoRA between a forward and its backward is an error.
    y, cache = ktf.moe_forward(state, x, ids, w.detach())
    with torch.no_grad():
        lora.down_b.mul_(1.0)  # any in-place op bumps the tensor's version
    try:
        ktf.moe_backward(state, cache, gy)
    except ValueError as e:
        print(f"(LoRA changed between forward and backward is refused: {e})")

    # ---- 5. moe_forward_async: overlap the experts with other torch work ------------------------------------
    if hasattr(ops, "moe_forward_async"):
        ids, w = route(x, router.detach(), k)
        other = torch.randn(T, H)
        proj = torch.randn(H, H) * H**-0.5

        # The overlap pays where the other work runs elsewhere (a GPU's share of the layer, or spare cores);
        # on a small CPU where torch and the library share the same cores, expect little or no gain.
        def torch_work():  # stand-in for e.g. the attention of the next micro-batch, or a GPU's share
            out = other
            for _ in range(4):
                out = torch.tanh(out @ proj)
            return out

        def timed(fn, repeat=3):
            best = math.inf
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            return best

        def serial():
            ktf.moe_forward(state, x, ids, w, save_for_backward=False)
            torch_work()

        def overlapped():
            handle = ktf.moe_forward_async(state, x, ids, w, save_for_backward=False)  # returns at once
            torch_work()  # runs in this thread while the library's workers compute the experts
            return handle.result()  # waits (GIL released) -> (y, None)

        y_async, _ = overlapped()
        y_sync, _ = ktf.moe_forward(state, x, ids, w, save_for_backward=False)
        same = torch.equal(y_async, y_sync)
        t_exp = timed(lambda: ktf.moe_forward(state, x, ids, w, save_for_backward=False))
        t_torch = timed(torch_work)
        t_ser, t_ovl = timed(serial), timed(overlapped)
        print(f"\nasync: experts {1e3 * t_exp:.1f} ms, torch work {1e3 * t_torch:.1f} ms; "
              f"serial {1e3 * t_ser:.1f} ms, overlapped {1e3 * t_ovl:.1f} ms "
              f"(both share {torch.get_num_threads()} torch / {threads} library threads on the same cores); "
              f"async result bitwise equal to sync: {same}")
    else:
        print("\n(this build of kt_functional has no moe_forward_async)")

    # ---- 6. check against the fp32 reference ---------------------------------------------------------------
    ids, w = route(x, router.detach(), k)
    y, cache = ktf.moe_forward(state, x, ids, w)
    gy = (torch.randn(T, H) * 0.01).bfloat16()
    grads = ktf.moe_backward(state, cache, gy)
    ref_kwargs = dict(gate=gate, up=up, down=down, lora=lora, scale=lora.scale)  # LoRA *after* training
    ref_y = reference.moe_reference(x, ids, w, **ref_kwargs)
    ref_g = reference.moe_reference_grads(x, ids, w, gy=gy, **ref_kwargs)
    errs = {"y": reference.rel_err(y, ref_y), "dx": reference.rel_err(grads.x, ref_g["x"]),
            "dw": reference.rel_err(grads.w, ref_g["w"])}
    errs.update({f"d{n}": reference.rel_err(getattr(grads.lora, n), ref_g[n]) for n in lora_params})
    print("\nrel_err vs fp32 reference (bf16 inputs/outputs, fp32 accumulation):")
    print("  " + "  ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    worst = max(errs.values())
    print(f"  worst {worst:.2e}: {'OK' if worst <= 1e-2 else 'ABOVE'} the test suite's tolerance 1e-2")

    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
