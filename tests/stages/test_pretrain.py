"""The pretraining stage end to end on the shipped corpus (CPU, seconds each)."""

import json
from pathlib import Path

import pytest
import torch

from instructkit.config import PretrainConfig, load_config
from instructkit.errors import ConfigError
from instructkit.stages import pretrain

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "tinyshakespeare_small.txt"


def config(tmp_path, *overrides):
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={SHAKESPEARE}",
        "data.seq_len=32",
        "data.val_fraction=0.05",
        "data.num_workers=1",
        "model.shape=tiny-llama",
        "train.max_steps=4",
        "train.micro_batch_size=8",
        "train.lr=3e-3",
        "train.eval_max_batches=2",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    return load_config(PretrainConfig, None, base + list(overrides))


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_the_shipped_corpus_and_final_loads(tmp_path):
    cfg = config(tmp_path, "train.max_steps=30", "train.warmup_steps=3", "train.eval_every=15")
    result = pretrain.run(cfg)
    records = metrics(cfg.output_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert len(losses) == 30
    assert losses[-1] < losses[0] - 0.6, (losses[0], losses[-1])
    assert evals[0][0] == 0 and evals[-1][0] == 30
    assert evals[-1][1] < evals[0][1] - 0.6, evals
    assert result.eval_loss == pytest.approx(evals[-1][1])
    start = next(r for r in records if r.get("event") == "start")
    assert start["data_tokens"] == result.corpus.n_tokens and start["data_corpus_rebuilt"] is True
    assert (Path(cfg.output_dir) / "corpus" / "tokens.bin").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = result.final_dir
    assert final == Path(cfg.output_dir) / "final" and (final / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert loaded.config.vocab_size == len(tok) == len(result.tokenizer)
    assert loaded.config.hidden_size == 64 and loaded.config.num_hidden_layers == 2
    ids = torch.tensor([tok("First Citizen:\nBefore we proceed")["input_ids"]])
    result.model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(ids).logits, loaded(ids).logits, atol=1e-5)

    # what `instructkit generate runs/pretrain/final` does
    from instructkit.models import load_for_inference

    model, tokenizer = load_for_inference(final)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_trained_tokenizer_path(tmp_path):
    cfg = config(tmp_path, "tokenizer.train=true", "tokenizer.vocab_size=512", "train.max_steps=2",
                 "data.num_workers=2")
    result = pretrain.run(cfg)
    out = Path(cfg.output_dir)
    assert len(result.tokenizer) == 512
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert result.model.get_input_embeddings().weight.shape[0] == 512
    assert result.corpus.meta["vocab_size"] == 512
    assert int(torch.from_numpy(result.corpus.array[:].astype("int64")).max()) < 512
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(result.final_dir)
    assert saved.get_vocab() == result.tokenizer.get_vocab()
    assert saved.eos_token == "<|end_of_text|>"


def _interrupt_at(monkeypatch, step_to_fail):
    from instructkit.engine import run as R

    real = R.optimizer_step

    def flaky(model, optimizer, max_grad_norm, guard, loss, step):
        if step == step_to_fail:
            raise KeyboardInterrupt("simulated kill")
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(R, "optimizer_step", flaky)


def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    # a small slice of the corpus: ~45 training windows of 32 tokens, 6 micro-batches of <= 8 per
    # epoch, so the run crosses an epoch boundary (a reshuffle) at step 6, where it resumes
    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text()[:4000])
    common = ["train.max_steps=8", "train.save_every=3", "train.eval_every=4", f"data.train={small}",
              "train.micro_batch_size=8"]
    full = config(tmp_path, *common, "output_dir=" + str(tmp_path / "full"))
    a_result = pretrain.run(full)
    cut = config(tmp_path, *common, "output_dir=" + str(tmp_path / "cut"))
    _interrupt_at(monkeypatch, 7)  # killed during step 8, last checkpoint at step 6
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cut)
    monkeypatch.undo()
    assert (tmp_path / "cut" / "checkpoints" / "step-000006").is_dir()
    resumed = pretrain.run(cut, resume=True)
    a = [(r["step"], r["loss"]) for r in metrics(full.output_dir) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in metrics(cut.output_dir) if "loss" in r]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6)
    assert resumed.steps == 8
    train_windows = len(resumed.corpus.split(32, 0.05)[0])
    assert 5 * 8 < train_windows <= 6 * 8  # 6 micro-batches per epoch: step 7 starts epoch 1
    assert not resumed.corpus.rebuilt  # the corpus was reused on resume
    for (n, p), (_, q) in zip(a_result.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_refuses_an_existing_run_without_resume(tmp_path):
    from instructkit.errors import UserError

    cfg = config(tmp_path, "train.max_steps=1", "train.eval_at_start=false")
    pretrain.run(cfg)
    with pytest.raises(UserError, match="already holds a run"):
        pretrain.run(cfg)


@pytest.mark.parametrize("override, message", [
    ("model.shape=gpt-17", "not a known shape"),
    ("model.num_kv_heads=3", "not a multiple of model.num_kv_heads"),
    ("data.seq_len=4", "too small"),
    ("tokenizer.name_or_path=tiny-llama", None),  # fine alone; with train=true below it is not
    ("data.val_fraction=1.0", "val_fraction"),
])
def test_config_checks(tmp_path, override, message):
    if message is None:
        with pytest.raises(ConfigError, match="not both"):
            config(tmp_path, override, "tokenizer.train=true")
        return
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, override)


def test_explicit_shape_and_unknown_key(tmp_path):
    cfg = config(tmp_path, "model.shape=null", "model.hidden_size=32", "model.intermediate_size=64",
                 "model.num_layers=1", "model.num_heads=2")
    shape = pretrain.model_shape(cfg)
    assert shape == {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2}
    with pytest.raises(ConfigError, match="missing model.num_heads"):
        config(tmp_path, "model.shape=null", "model.hidden_size=32", "model.intermediate_size=64",
               "model.num_layers=1")
    with pytest.raises(ConfigError, match="Did you mean 'seq_len'"):
        config(tmp_path, "data.seqlen=64")


def test_shipped_config_is_valid():
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain_tiny.yaml")
    assert cfg.model.shape == "tiny-llama-256" and cfg.data.seq_len == 128
    assert cfg.data.train == ["data/tinyshakespeare_small.txt"]
