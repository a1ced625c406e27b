"""PPO step time split into generation, scoring and training, for a LLaMA-shaped model.

    python bench/ppo_step.py --shape tiny                    # CPU, a minute
    python bench/ppo_step.py --shape llama-3.2-1b            # GPU: batch 64, prompt 256, 256 new tokens

Random weights of the chosen shape for the policy and for a reward model of the same shape,
a word-level tokenizer with the shape's vocabulary, random prompts of a fixed length. Runs the
real PPO stage (`instructkit.stages.ppo.run`) for --steps steps and reports, from its
metrics.jsonl, the mean over the steps after the first (warm-up): seconds per step in
generation (sampling with the KV cache), scoring (reward model, old-policy and reference
log-probs, values) and training (PPO epochs), generated tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import SHAPES  # noqa: E402  (same shapes as the SFT benchmark)


def word_tokenizer(vocab_size: int, folder: Path):
    """A tokenizer with exactly ``vocab_size`` ids (words "w0", "w1", ...), saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def save_random(shape: str, folder: Path, tokenizer, classifier: bool, dtype) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    h, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1)
    torch.manual_seed(1 if classifier else 0)
    cls = LlamaForSequenceClassification if classifier else LlamaForCausalLM
    model = cls(cfg).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if classifier:  # what `instructkit rm` stores for PPO's score normalisation
        conf = json.loads((folder / "config.json").read_text())
        conf.update(instructkit_reward_mean=0.0, instructkit_reward_std=1.0)
        (folder / "config.json").write_text(json.dumps(conf))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=SHAPES)
    p.add_argument("--layout", default="lora", choices=["lora", "full"])
    p.add_argument("--batch", type=int, default=None, help="prompts per step (64 GPU, 8 CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="(256 GPU, 32 CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="(256 GPU, 32 CPU)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--output", help="write the summary as JSON here")
    args = p.parse_args()

    import torch

    from instructkit.config import PPOConfig, load_config
    from instructkit.stages import ppo

    gpu = torch.cuda.is_available()
    batch = args.batch or (64 if gpu else 8)
    prompt_len = args.prompt_len or (256 if gpu else 32)
    new_tokens = args.new_tokens or (256 if gpu else 32)
    vocab = SHAPES[args.shape][5]
    with tempfile.TemporaryDirectory(prefix="instructkit-bench-") as tmp:
        tmp = Path(tmp)
        tok = word_tokenizer(vocab, tmp / "tok")
        dtype = torch.bfloat16 if gpu else torch.float32
        save_random(args.shape, tmp / "policy", tok, classifier=False, dtype=dtype)
        save_random(args.shape, tmp / "reward", tok, classifier=True, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        with open(tmp / "prompts.jsonl", "w") as f:
            for _ in range(batch * (args.steps + 1)):
                ids = torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist()
                f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids)}) + "\n")
        (tmp / "template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        cfg = load_config(PPOConfig, None, [
            f"output_dir={tmp / 'run'}", f"policy.name_or_path={tmp / 'policy'}",
            f"policy.chat_template={tmp / 'template.jinja'}",
            f"policy.precision={'bf16-mixed' if gpu else 'fp32'}", f"reward.name_or_path={tmp / 'reward'}",
            f"adapter.kind={'lora' if args.layout == 'lora' else 'none'}", "adapter.dropout=0.0",
            f"data.train={tmp / 'prompts.jsonl'}", "data.format=prompts", "data.template=chat",
            f"rollout.prompts_per_step={batch}", f"rollout.max_prompt_len={prompt_len}",
            f"rollout.max_new_tokens={new_tokens}", f"rollout.micro_batch_size={min(batch, 16)}",
            f"ppo.mini_batch_size={max(1, batch // 4)}", "ppo.epochs=1",
            f"train.max_steps={args.steps}", "log.progress=false", "log.tensorboard=false",
        ])
        # Random weights rarely emit EOS: every response runs to max_new_tokens, the worst case.
        ppo.run(cfg)
        rows = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_generate" in r][1:] or rows[-1:]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    summary = {
        "shape": args.shape, "layout": args.layout, "device": torch.cuda.get_device_name() if gpu else "cpu",
        "prompts_per_step": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "steps_measured": len(rows),
        "generate_s": mean("time_generate"), "score_s": mean("time_score"), "train_s": mean("time_train"),
        "gen_tokens_per_s": mean("gen_tokens_per_s"), "response_len": mean("response_len"),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in rows),
    }
    total = summary["generate_s"] + summary["score_s"] + summary["train_s"]
    print(f"\nPPO step, {args.shape} shape, {args.layout} layout, {summary['device']}: batch {batch}, "
          f"prompt {prompt_len}, {new_tokens} new tokens")
    for k in ("generate_s", "score_s", "train_s"):
        print(f"  {k[:-2]:9} {summary[k]:8.2f} s  ({100 * summary[k] / total:4.1f}%)")
    print(f"  total     {total:8.2f} s;  generation {summary['gen_tokens_per_s']:.0f} tokens/s;  "
          f"peak memory {summary['peak_mem_gb']:.2f} GB")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
