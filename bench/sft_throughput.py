"""SFT step throughput: instructkit's engine against plain transformers + peft, same run.

    python bench/sft_throughput.py --shape tiny                      # CPU, seconds
    python bench/sft_throughput.py --shape llama-3.2-1b --steps 20   # GPU
    python bench/sft_throughput.py --shape llama-3.1-8b --methods lora --checkpointing

Every case runs in its own subprocess (clean peak-memory numbers) on the same synthetic
workload: examples with log-normal lengths (median ~244 tokens, as chat SFT data), a prompt
part without loss and an answer part with loss, random weights of the chosen shape.

  baseline   transformers + peft as a hand-written loop would use them: shuffled batches of
             `micro_batch` examples padded to the longest, a 2D attention mask, `labels=` so the
             model computes the loss over full logits, torch AdamW.
  ours       instructkit's data and engine: packed rows (or length-grouped batches with
             --no-packing) with a block-diagonal mask, the LM head only on answer tokens in
             chunks, the shared optimizer step.

Reported: real (non-pad) tokens/s, peak memory, MFU, and ours / baseline.
MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per real token
  6 * N_trainable + 4 * N_frozen + 12 * n_layers * hidden * seq_len
(forward 2N plus backward 4N for trained weights; frozen weights need the forward and the
activation gradient, 2N + 2N; the last term is attention scores and values, forward and
backward, with seq_len the row length). Peak FLOP/s: --peak-tflops (default 989 for an H100
bf16 dense; on CPU MFU is not meaningful and is left out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (256, 688, 4, 8, 4, 8192),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
}


def make_examples(n: int, seq_len: int, vocab: int, seed: int = 0):
    """Synthetic SFT examples: log-normal lengths (median ~244, mean ~395), 30% prompt."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=math.log(244), sigma=0.98, size=n).astype(int), 16, seq_len)
    examples = []
    for length in lengths:
        ids = rng.integers(3, vocab, size=int(length)).tolist()
        n_prompt = int(length * 0.3)
        labels = [-100] * n_prompt + ids[n_prompt:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def build_model(shape: str, method: str, dtype, device, attn: str, checkpointing: bool, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192,
        tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config._attn_implementation = attn  # same backend for both sides
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        if checkpointing:
            model.enable_input_require_grads()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    return model, cfg


def run_case(args) -> dict:
    import torch

    from instructkit import data as D
    from instructkit.engine.lm import lm_loss_sum, to_device

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # bf16 autocast over fp32 master weights on GPU (fp32 on CPU, where bf16 is slow)
    gpu = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    weights_dtype = torch.bfloat16 if (gpu and args.method == "full" and args.pure_bf16) else torch.float32
    model, cfg = build_model(args.shape, args.method, weights_dtype, device, args.attn, args.checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=gpu)
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    examples = make_examples(args.examples, args.seq_len, cfg.vocab_size, seed=1)
    lengths = [len(e["input_ids"]) for e in examples]

    if args.impl == "ours":
        plan = D.plan_micro_batches(
            lengths, args.micro_batch, args.seq_len, args.packing, True, seed=0, epoch=0
        )
        batches = [D.collate(examples, rows, 0, args.attn) for rows in plan]
        real = [sum(lengths[i] for row in rows for i in row) for rows in plan]

        def step(batch):
            batch = to_device(batch, device)
            with amp:
                loss, n = lm_loss_sum(model, batch, chunk_size=args.loss_chunk_size)
            (loss / max(n, 1)).backward()
    else:
        import random

        order = list(range(len(examples)))
        random.Random(0).shuffle(order)
        batches = []
        for i in range(0, len(order), args.micro_batch):
            chunk = [examples[j] for j in order[i : i + args.micro_batch]]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[r, :n] = torch.tensor(e["input_ids"])
                labels[r, :n] = torch.tensor(e["labels"])
                mask[r, :n] = 1
            batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
        real = [int(b["attention_mask"].sum()) for b in batches]

        def step(batch):
            batch = {k: v.to(device) for k, v in batch.items()}
            with amp:
                loss = model(**batch, use_cache=False).loss
            loss.backward()

    def one(batch):
        step(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = min(args.warmup, len(batches) - 1)
    for b in batches[:warm]:
        one(b)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = batches[warm : warm + args.steps]
    tokens = sum(real[warm : warm + args.steps])
    t0 = time.perf_counter()
    for b in timed:
        one(b)
    if gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tok_s = tokens / elapsed
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    h, _, layers, *_ = SHAPES[args.shape]
    flops_per_token = 6 * n_train + 4 * (n_total - n_train) + 12 * layers * h * args.seq_len
    mfu = tok_s * flops_per_token / (args.peak_tflops * 1e12) if gpu else None
    return {
        "impl": args.impl, "method": args.method, "packing": args.packing, "shape": args.shape,
        "device": torch.cuda.get_device_name() if gpu else "cpu", "steps": len(timed),
        "real_tokens": tokens, "seconds": elapsed, "tokens_per_s": tok_s, "peak_gb": peak, "mfu": mfu,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=SHAPES)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--seq-len", type=int, default=None, help="row length (default 2048 GPU, 512 CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default 8 GPU, 4 CPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--pure-bf16", action="store_true", help="full fine-tune with bf16 weights (GPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--loss-chunk-size", type=int, default=4096,
                   help="ours: LM head + loss on target tokens in chunks (train.loss_chunk_size); 0: full logits")
    p.add_argument("--output", help="also write the results as JSON here")
    # internal: one case in this process
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    args.seq_len = args.seq_len or (2048 if gpu else 512)
    args.micro_batch = args.micro_batch or (8 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 4)
    # enough examples for warmup + steps in the baseline's unpacked batches
    args.examples = (args.warmup + args.steps + 2) * args.micro_batch * 6

    if args.case:
        args.impl, args.method, packing = args.case.split(":")
        args.packing = packing == "packed"
        print(json.dumps(run_case(args)))
        return

    results = []
    for method in args.methods.split(","):
        cases = [("baseline", "padded"), ("ours", "packed"), ("ours", "grouped")]
        for impl, packing in cases:
            cmd = [sys.executable, __file__, "--case", f"{impl}:{method}:{packing}"] + [
                a for a in sys.argv[1:] if a not in ("--output",)
            ]
            if args.output and args.output in cmd:
                cmd.remove(args.output)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"case {impl}:{method}:{packing} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["layout"] = packing
            results.append(r)
    print(f"\nshape {args.shape}, row length {args.seq_len}, micro-batch {args.micro_batch}, device {results[0]['device']}")
    print(f"{'method':6} {'impl':9} {'layout':8} {'tokens/s':>10} {'peak GB':>8} {'MFU':>6} {'vs baseline':>11}")
    for method in args.methods.split(","):
        base = next(r for r in results if r["method"] == method and r["impl"] == "baseline")
        for r in (x for x in results if x["method"] == method):
            r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
            print(f"{method:6} {r['impl']:9} {r['layout']:8} {r['tokens_per_s']:>10.0f} {r['peak_gb']:>8.2f} {mfu:>6} {r['ratio']:>10.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
