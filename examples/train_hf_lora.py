"""LoRA fine-tuning of a transformers Qwen3-MoE with its routed experts in kt-functional (the torch adapter).

What it shows
-------------
1. A model: by default a tiny Qwen3-MoE built from ``AutoConfig.for_model("qwen3_moe", ...)``
   with random weights (no download); or a local checkpoint with ``--model DIR``
   (``AutoModelForCausalLM.from_pretrained``).
2. ``kt_functional.hf.patch_model(model, lora_rank=8, lora_alpha=16)``: every MoE block's routed
   experts are packed into CPU memory (the torch expert weights are freed) and get a trainable
   LoRA on every expert; the base model is frozen, routers / attention / norms stay torch.
3. A plain torch training loop: AdamW over the parameters with ``requires_grad`` (the expert
   LoRA; ``--train-router`` adds the routers), gradient accumulation (``--accum``), optional
   non-reentrant activation checkpointing (``--checkpointing``), loss and tokens/s per step.
   The data is a text file read as bytes (token = byte value, vocab 256; default: the project's
   README.md).
4. ``kt_functional.hf.save_adapter(model, out_dir)`` writes a PEFT adapter
   (adapter_config.json + adapter_model.safetensors); a freshly built, freshly patched model then
   gets it back with ``kt_functional.hf.load_adapter`` and gives the same logits.

Run it (about 10-30 s on 2 cores with the defaults):

    python examples/train_hf_lora.py
    python examples/train_hf_lora.py --steps 50 --accum 4 --checkpointing --out /tmp/kt-adapter
    python examples/train_hf_lora.py --model /path/to/Qwen3-30B-A3B --dtype bf16 --seq-len 512

With ``--model DIR`` the text is tokenized by the checkpoint's tokenizer when DIR has one.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from kt_functional import hf

DEFAULT_TEXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(args):
    """A Qwen3-MoE: tiny with random weights (seeded, so rebuilding gives the same base), or --model DIR."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[args.dtype]
    if args.model:
        # For a model too big for RAM as torch tensors one would build it with empty expert weights
        # and pass patch_model(..., checkpoint=DIR) to stream the experts from the safetensors files.
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=256,  # byte-level "tokenizer"
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,  # dense MLP size (unused: every layer is MoE here)
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,  # as Qwen3-30B-A3B
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_tokens(args, vocab_size: int) -> torch.Tensor:
    """The text file as a 1-D tensor of token ids: the checkpoint's tokenizer where --model DIR has one, else bytes."""
    with open(args.text, "rb") as f:
        data = f.read()
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if args.model and any(os.path.exists(os.path.join(args.model, f)) for f in tokenizer_files):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        ids = torch.tensor(tok(data.decode("utf-8", errors="replace"))["input_ids"], dtype=torch.long)
        print(f"tokenizer: {type(tok).__name__} from {args.model}")
        return ids
    if vocab_size < 256:
        raise SystemExit(f"model: vocab_size {vocab_size} < 256 and no tokenizer in --model: cannot use bytes as ids")
    print("tokenizer: bytes (token id = byte value)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """batch random windows of seq_len + 1 tokens (inputs and shifted labels come from one window)."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])


def lm_loss(model, window: torch.Tensor) -> torch.Tensor:
    # labels=input_ids: transformers shifts them inside the loss.
    return model(input_ids=window, labels=window).loss


@torch.no_grad()
def eval_loss(model, batches) -> float:
    was_training = model.training
    model.eval()
    loss = sum(lm_loss(model, b).item() for b in batches) / len(batches)
    model.train(was_training)
    return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local checkpoint dir (default: a tiny random Qwen3-MoE)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="training text file (default: the project's README.md)")
    p.add_argument("--out", default=None, help="adapter output dir (default: a temporary dir)")
    # tiny model (ignored with --model)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--moe-intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    # training
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the torch parts")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-router", action="store_true", help="also train the routers (mlp.gate)")
    p.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument("--threads", type=int, default=None, help="kt-functional worker threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t_start = time.perf_counter()

    # ---- model + patch ---------------------------------------------------------------------------------------
    model = build_model(args)
    n_before = sum(p.numel() for p in model.parameters())
    hf.patch_model(model, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, threads=args.threads,
                   seed=args.seed)
    layers = hf.kt_layers(model)  # [(module path, KTExperts)]
    print(f"model {type(model).__name__}: {n_before / 1e6:.2f} M torch parameters before patching; "
          f"{len(layers)} MoE layers moved to kt-functional, e.g.\n  {layers[0][0]}: {layers[0][1]}")
    if args.train_router:
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable: {sum(p.numel() for p in params):,} parameters in {len(params)} tensors "
          f"(expert LoRA{' + routers' if args.train_router else ''}; the rest is frozen)")
    # The kernels read the LoRA parameters at every call: AdamW's in-place step needs no sync.
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    if args.checkpointing:
        # Non-reentrant checkpointing: the expert layer's residuals (its MoECache) are dropped after
        # the forward and recomputed in the backward, like any other saved activation.
        # (transformers >= 5.x names it activation_checkpointing_enable; gradient_checkpointing_enable is
        # its deprecated alias there and the only name in older releases.)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # (Qwen3-MoE has no dropout by default; train() also turns checkpointing on)

    # ---- data ------------------------------------------------------------------------------------------------
    tokens = load_tokens(args, model.config.get_text_config().vocab_size)
    if len(tokens) < args.seq_len + 2:
        raise SystemExit(f"--text: {len(tokens)} tokens, need more than --seq-len + 1 = {args.seq_len + 1}")
    gen = torch.Generator().manual_seed(args.seed)
    eval_batches = [sample_batch(tokens, args.batch, args.seq_len, gen) for _ in range(2)]
    print(f"data: {args.text} -> {len(tokens):,} tokens; {args.accum} x {args.batch} x {args.seq_len} "
          f"tokens per step; checkpointing {'on' if args.checkpointing else 'off'}")
    loss0 = eval_loss(model, eval_batches)
    print(f"loss on 2 fixed batches before training {loss0:.4f} (uniform over 256 bytes: {math.log(256):.4f})")

    # ---- training loop ---------------------------------------------------------------------------------------
    tokens_per_step = args.accum * args.batch * args.seq_len
    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(args.accum):
            # Each micro-batch's forward keeps its own expert cache; its backward consumes it.
            loss = lm_loss(model, sample_batch(tokens, args.batch, args.seq_len, gen)) / args.accum
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {total:.4f}  grad-norm {grad_norm:.3f}  "
                  f"{tokens_per_step / dt:,.0f} tokens/s  ({dt * 1e3:.0f} ms)")
    train_s = time.perf_counter() - t_train
    loss1 = eval_loss(model, eval_batches)
    print(f"trained {args.steps} steps in {train_s:.1f} s = {args.steps * tokens_per_step / train_s:,.0f} tokens/s; "
          f"loss on the fixed batches {loss0:.4f} -> {loss1:.4f}")

    # ---- save the adapter, load it into a fresh model --------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        hf.save_adapter(model, out)  # PEFT format: peft.PeftModel.from_pretrained(unpatched_model, out) works too
        files = ", ".join(f"{f} ({os.path.getsize(os.path.join(out, f)):,} bytes)" for f in sorted(os.listdir(out)))
        print(f"saved adapter to {out if args.out else '(temporary dir)'}: {files}")

        fresh = build_model(args)  # the same base weights (same seed / same checkpoint)
        hf.patch_model(fresh, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, threads=args.threads)
        hf.load_adapter(fresh, out)  # replaces the LoRA parameters: build any optimizer after this
    if args.train_router:
        print("(the routers were trained too: the adapter holds only the expert LoRA; save the routers yourself)")
        fresh.load_state_dict({n: p.detach() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")},
                              strict=False)  # named_parameters: state_dict() would also unpack every expert
    model.eval()
    fresh.eval()
    with torch.no_grad():
        window = eval_batches[0]
        a, b = model(input_ids=window).logits, fresh(input_ids=window).logits
    diff = (a - b).abs().max().item()
    print(f"fresh model + load_adapter: loss on the fixed batches {eval_loss(fresh, eval_batches):.4f}, "
          f"max |logits - trained logits| = {diff:.2e} {'(identical)' if diff == 0 else ''}")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
