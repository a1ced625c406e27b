"""The reward model: scores at the last real token, LoRA/full training, saving."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from instructkit.config import AdapterConfig
from instructkit.models import (
    build_tiny_model,
    count_parameters,
    load_reward_model,
    load_reward_stats,
    reward_scores,
    save_reward_model,
)
from instructkit.losses.preference import pairwise_reward_loss

EOS = 1020  # tiny tokenizer: <|end_of_text|>
PAD = 1021  # <|pad|>
SEQS = [[5, 17, 300, 41, EOS], [9, 8, 7, EOS], [11, 12, 13, 14, 15, 16, EOS]]


def pad_batch(seqs, pad_id, side):
    n = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = n - len(s)
        if side == "right":
            ids.append(s + [pad_id] * fill)
            mask.append([1] * len(s) + [0] * fill)
        else:
            ids.append([pad_id] * fill + s)
            mask.append([0] * fill + [1] * len(s))
    return torch.tensor(ids), torch.tensor(mask)


def unpadded_scores(model, seqs):
    out = []
    for s in seqs:
        ids = torch.tensor([s])
        out.append(reward_scores(model, ids, torch.ones_like(ids)))
    return torch.cat(out)


def spread_head(model, scale=50.0):
    """Make the scores large enough that a wrong token shows (the init head is tiny)."""
    with torch.no_grad():
        head = model.score
        head = getattr(head, "modules_to_save", {"default": head})["default"]
        head.weight.mul_(scale)


@pytest.fixture
def rm(tiny_model_cfg, tiny_tokenizer):
    model = load_reward_model(tiny_model_cfg, AdapterConfig(), tiny_tokenizer, "cpu", seed=0)
    spread_head(model)
    return model.eval()


def test_reward_model_is_a_sequence_classifier(rm, tiny_tokenizer):
    assert isinstance(rm, LlamaForSequenceClassification)
    assert rm.config.num_labels == 1 and rm.score.out_features == 1
    assert rm.config.pad_token_id == tiny_tokenizer.pad_token_id
    # the decoder is the tiny causal LM of the same seed (as if loaded from its checkpoint)
    lm = build_tiny_model("tiny-llama", seed=0)
    for (name, a), b in zip(rm.model.state_dict().items(), lm.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_do_not_depend_on_padding(rm, side):
    with torch.no_grad():
        expected = unpadded_scores(rm, SEQS)
        ids, mask = pad_batch(SEQS, PAD, side)
        got = reward_scores(rm, ids, mask)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert expected.std() > 0.01  # the sequences score differently
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_no_padding_batch_matches_native_forward(rm):
    seqs = [[5, 17, 300, 41, EOS], [9, 8, 7, 6, EOS]]
    ids = torch.tensor(seqs)
    with torch.no_grad():
        ours = reward_scores(rm, ids, torch.ones_like(ids))
        native = rm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.squeeze(-1)
    assert torch.allclose(ours, native, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_equals_eos_scores_the_real_eos(rm, side):
    rm.config.pad_token_id = EOS  # pad == eos, as with many base tokenizers
    with torch.no_grad():
        expected = unpadded_scores(rm, SEQS)
        ids, mask = pad_batch(SEQS, EOS, side)
        got = reward_scores(rm, ids, mask)
        # transformers' own forward takes the rightmost token != pad id: the token BEFORE
        # the EOS, a different score
        native = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(native, expected, atol=1e-3)


def tiny_gpt2_reward_model():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(
        vocab_size=1024, n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(cfg).eval()
    spread_head(model)
    return model


def test_left_padding_with_absolute_positions():
    # RoPE models only see relative positions, so a left-padding offset cancels out; GPT-2's
    # learned absolute positions show whether left-padded rows get the positions they would
    # have unpadded (counted from the mask).
    model = tiny_gpt2_reward_model()
    ids, mask = pad_batch(SEQS, PAD, "left")
    with torch.no_grad():
        expected = unpadded_scores(model, SEQS)
        got = reward_scores(model, ids, mask)
        naive_positions = torch.arange(ids.shape[1]).expand_as(ids)
        naive = reward_scores(model, ids, mask, position_ids=naive_positions)
    assert torch.allclose(got, expected, atol=1e-5)
    # positions counted from the padded start change the left-padded rows (0 and 1) only
    assert torch.allclose(naive[2], expected[2], atol=1e-5)
    assert not torch.allclose(naive[:2], expected[:2], atol=1e-3)


def test_lora_reward_model_trains_head_and_adapter_only(tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.freeze_layers = 1
    model = load_reward_model(
        tiny_model_cfg, AdapterConfig(kind="lora", r=4), tiny_tokenizer, "cpu", seed=0
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all("lora_" in n or ".score.modules_to_save." in n for n in trainable), trainable
    assert any(".score.modules_to_save." in n for n in trainable)
    # freeze_layers=1: no adapter weight of layer 0 trains, layer 1's do
    assert not any(".layers.0." in n for n in trainable)
    assert any(".layers.1." in n and "lora_" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids, mask = pad_batch(SEQS[:2], PAD, "right")
    for _ in range(2):  # LoRA B starts at 0: A moves only from the second step
        scores = reward_scores(model, ids, mask)
        pairwise_reward_loss(scores[:1], scores[1:]).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if n in trainable:
            assert changed, f"{n} did not train"
        else:
            assert not changed, f"{n} changed but is frozen"


def test_full_reward_model_with_frozen_layers_and_checkpointing(tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.freeze_layers = 1
    tiny_model_cfg.gradient_checkpointing = True
    model = load_reward_model(tiny_model_cfg, AdapterConfig(), tiny_tokenizer, "cpu", seed=0)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert model.score.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    ids, mask = pad_batch(SEQS, PAD, "right")
    reward_scores(model, ids, mask).sum().backward()
    assert model.score.weight.grad is not None
    assert model.model.layers[1].mlp.up_proj.weight.grad is not None


def test_reward_model_from_a_local_causal_lm_folder(tiny_model_cfg, tiny_tokenizer, tmp_path):
    lm = build_tiny_model("tiny-llama", seed=5)
    lm.save_pretrained(tmp_path / "lm")
    tiny_model_cfg.name_or_path = str(tmp_path / "lm")
    a = load_reward_model(tiny_model_cfg, None, tiny_tokenizer, "cpu", seed=1)
    b = load_reward_model(tiny_model_cfg, None, tiny_tokenizer, "cpu", seed=1)
    assert isinstance(a, LlamaForSequenceClassification) and a.config.num_labels == 1
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(a.score.weight, b.score.weight)  # the new head is drawn from the seed


def check_saved(out, model, mean, std):
    assert not out.with_name(out.name + ".tmp").exists()
    meta = json.loads((out / "instructkit.json").read_text())
    assert meta["kind"] == "reward" and meta["reward_mean"] == mean and meta["reward_std"] == std
    assert load_reward_stats(out) == (mean, std)
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert loaded.config.instructkit_reward_mean == mean
    assert loaded.config.instructkit_reward_std == std
    assert loaded.config.num_labels == 1
    model.eval()
    with torch.no_grad():
        for side in ("right", "left"):
            ids, mask = pad_batch(SEQS, PAD, side)
            assert torch.allclose(
                reward_scores(loaded, ids, mask), reward_scores(model, ids, mask), atol=1e-5
            )
        # transformers' own forward of the reloaded folder agrees (pad != eos here)
        ids, mask = pad_batch(SEQS, PAD, "right")
        native = loaded(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert torch.allclose(native, reward_scores(model, ids, mask), atol=1e-5)
    return loaded


def test_save_full_reward_model_loads_with_auto_class(rm, tiny_model_cfg, tiny_tokenizer, tmp_path):
    out = save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", tiny_model_cfg, 0.25, 1.5)
    check_saved(out, rm, 0.25, 1.5)
    # saving again replaces the folder
    out = save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", tiny_model_cfg, -1.0, 2.0)
    assert load_reward_stats(out) == (-1.0, 2.0)
    assert not (tmp_path / "rm.old").exists()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_save_adapter_reward_model_merges(kind, tiny_model_cfg, tiny_tokenizer, tmp_path):
    model = load_reward_model(
        tiny_model_cfg, AdapterConfig(kind=kind, r=4), tiny_tokenizer, "cpu", seed=0
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move adapter and head away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = save_reward_model(model, tiny_tokenizer, tmp_path / "rm", tiny_model_cfg, 0.5, 3.0)
    # the model is not changed by saving (the merge runs on copies)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach()), n
    assert not (out / "adapter_config.json").exists()
    loaded = check_saved(out, model, 0.5, 3.0)
    assert not any("lora" in n for n in loaded.state_dict())


def test_load_reward_stats_needs_the_statistics(tmp_path):
    from instructkit.errors import UserError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="reward statistics"):
        load_reward_stats(tmp_path)


def test_num_padding_at_beginning_message_explains():
    from instructkit.config import NUM_PADDING_AT_BEGINNING_MESSAGE

    msg = NUM_PADDING_AT_BEGINNING_MESSAGE
    assert "num_padding_at_beginning" in msg and "attention mask" in msg
    assert "pad == eos" in msg
