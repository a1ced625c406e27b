"""Evaluation metrics checked by hand on a tiny random LLaMA: perplexity is exp(mean token
loss) over the trained tokens; reward accuracy is the count of correctly ordered pairs;
prompt sets and sample generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instructkit.config import RMConfig, load_config
from instructkit.errors import DataError, UserError
from instructkit.evaluate.config import PerplexitySection, RewardEvalSection, SamplesSection

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny():
    from instructkit.models import build_tiny_model, tiny_tokenizer

    return build_tiny_model("tiny-llama", seed=3).eval(), tiny_tokenizer()


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_perplexity_is_exp_of_mean_token_loss(tmp_path, tiny, train_on_prompt):
    from instructkit.data import build_sft_data
    from instructkit.evaluate.perplexity import evaluate_perplexity

    model, tok = tiny
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 1)))}
            for i in range(7)]
    sec = PerplexitySection(data=str(write_jsonl(tmp_path / "d.jsonl", rows)), format="alpaca",
                            max_seq_len=64, batch_size=3, train_on_prompt=train_on_prompt)
    res = evaluate_perplexity(model, tok, sec, torch.device("cpu"))

    # by hand: each example alone, no padding, summed cross-entropy over trained tokens
    examples = build_sft_data(sec.data_config(), tok).train
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = model(ids).logits[0, :-1]
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    assert res["examples"] == 7 and res["tokens"] == count
    assert res["loss"] == pytest.approx(total / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_on_plain_text_and_bad_data(tmp_path, tiny):
    from instructkit.evaluate.perplexity import evaluate_perplexity

    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n")
    res = evaluate_perplexity(model, tok, PerplexitySection(data=str(text), format="text"), "cpu")
    assert res["examples"] == 2 and res["tokens"] > 10 and res["ppl"] > 1
    with pytest.raises(DataError, match="perplexity.data"):
        evaluate_perplexity(model, tok, PerplexitySection(data=str(tmp_path / "nope.jsonl")), "cpu")


# --------------------------------------------------------------------------- reward accuracy


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny reward model trained for 2 steps by the rm stage (configs/tiny/rm.yaml)."""
    from instructkit.stages import rm

    out = tmp_path_factory.mktemp("rm") / "run"
    cfg = load_config(RMConfig, REPO / "configs/tiny/rm.yaml", [
        f"output_dir={out}", f"data.train={REPO / 'data/hh_rlhf_harmless_sample.jsonl'}",
        "train.max_steps=2", "data.max_examples=32", "rm.stats_max_groups=8", "train.eval_every=0", "train.save_every=0", "train.eval_at_start=false",
        "log.tensorboard=false", "model.device=cpu"])
    return rm.run(cfg).final_dir


def preference_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Question {i}?", "chosen": f"A helpful answer number {i}.",
             "rejected": f"no {'!' * i}"} for i in range(9)]
    rows.append({"prompt": "Rank these", "responses": ["first", "second one", "third answer here"]})
    return write_jsonl(tmp_path / "pairs.jsonl", rows[:9]), write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": f"Rank {i}", "responses": [f"best {i}", f"middle answer {i}", f"worst {i}!!"]}
        for i in range(4)])


def test_reward_accuracy_equals_a_manual_count(tmp_path, reward_model_dir):
    from instructkit.data import build_preference_data
    from instructkit.evaluate.reward_acc import load_reward_for_eval, reward_accuracy
    from instructkit.models import reward_scores

    pairs, ranked = preference_file(tmp_path)
    model, tok = load_reward_for_eval(str(reward_model_dir), torch.device("cpu"))
    for path, n_pairs in ((pairs, 9), (ranked, 4 * 3)):
        sec = RewardEvalSection(data=str(path), max_seq_len=128, batch_size=3)
        res = reward_accuracy(model, tok, sec, torch.device("cpu"))
        # by hand: score every response alone (no padding), compare within each group
        correct = total = 0
        margins = []
        with torch.no_grad():
            for ex in build_preference_data(sec.data_config(), tok).train:
                scores = [float(reward_scores(model, torch.tensor([r["input_ids"]]),
                                              torch.ones(1, len(r["input_ids"]), dtype=torch.long)))
                          for r in ex.responses]
                for a in range(len(scores)):
                    for b in range(a + 1, len(scores)):
                        correct += scores[a] > scores[b]
                        margins.append(scores[a] - scores[b])
                        total += 1
        assert total == n_pairs == res["n_pairs"]
        assert res["n_correct"] == correct
        assert res["accuracy"] == pytest.approx(correct / total)
        assert res["margin"] == pytest.approx(sum(margins) / total, abs=1e-4)


def test_reward_model_path_errors(tmp_path, tiny):
    from instructkit.evaluate.reward_acc import load_reward_for_eval
    from instructkit.config import ModelConfig
    from instructkit.models import save_final

    with pytest.raises(UserError, match="config.json"):
        load_reward_for_eval(str(tmp_path / "none"), "cpu")
    model, tok = tiny
    save_final(model, tok, tmp_path / "lm", ModelConfig(name_or_path="tiny-llama"))
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_for_eval(str(tmp_path / "lm"), "cpu")


# --------------------------------------------------------------------------- samples


def test_prompt_sets(tmp_path):
    from instructkit.evaluate.samples import load_prompt_set

    q = write_jsonl(tmp_path / "q.jsonl", [{"question": f"Q{i % 3}"} for i in range(6)])
    convs = load_prompt_set(SamplesSection(prompts=str(q), field="question"))
    assert [c[-1]["content"] for c in convs] == ["Q0", "Q1", "Q2"]  # duplicates dropped
    assert len(load_prompt_set(SamplesSection(prompts=str(q), field="question", max_prompts=2))) == 2
    with pytest.raises(DataError, match="samples.field"):
        load_prompt_set(SamplesSection(prompts=str(q), format="prompts"))
    sft = load_prompt_set(SamplesSection(prompts=str(REPO / "data/selfinstruct_seed_tasks.jsonl"),
                                         format="self_instruct", max_prompts=5))
    assert len(sft) == 5 and all(c[-1]["role"] == "user" for c in sft)
    hh = load_prompt_set(SamplesSection(prompts=str(REPO / "data/hh_rlhf_harmless_sample.jsonl"),
                                        format="hh", max_prompts=5))
    assert len(hh) == 5


def test_generate_samples_greedy_and_long_prompts(tmp_path, tiny):
    from instructkit.evaluate.samples import generate_samples, read_responses, write_jsonl_atomic

    model, tok = tiny
    convs = [[{"role": "user", "content": f"Tell me about {w}."}] for w in ("cats", "dogs", "the sea")]
    convs.append([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "word " * 300}])
    sec = SamplesSection(prompts="x", max_new_tokens=6, batch_size=2, max_prompt_len=64)
    rows = generate_samples(model, tok, convs, sec)
    assert [r["prompt"] for r in rows[:3]] == [c[0]["content"] for c in convs[:3]]
    assert "messages" in rows[3] and "messages" not in rows[0]
    assert rows == generate_samples(model, tok, convs, sec)  # temperature 0: greedy, reproducible
    path = write_jsonl_atomic(tmp_path / "s.jsonl", rows)
    assert not (tmp_path / "s.jsonl.tmp").exists()
    assert read_responses(path, "judge.responses") == json.loads(json.dumps(rows))
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"record 1: no field 'response'.*pairwise.responses_b"):
        read_responses(tmp_path / "bad.jsonl", "pairwise.responses_b")
