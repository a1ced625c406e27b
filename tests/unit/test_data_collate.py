"""collate: shifted targets, restarted positions, block-diagonal masks; and the key check that a
packed batch gives a tiny Llama the same logits and loss as running the examples one by one."""

from __future__ import annotations

import pytest
import torch

from instructkit.data import block_causal_mask, collate, plan_micro_batches, tokenize_conversation

try:
    from conftest_data import CHATML, make_tokenizer
except ImportError:  # tests/unit became a package
    from .conftest_data import CHATML, make_tokenizer

PAD = 0


def ex(ids, labels=None):
    return {"input_ids": list(ids), "labels": list(ids) if labels is None else list(labels)}


def test_data_collate_packed_targets_positions_mask():
    examples = [
        ex([10, 11, 12], [-100, 11, 12]),
        ex([20, 21], [-100, 21]),
        ex([30, 31, 32, 33], [-100, -100, 32, 33]),
    ]
    b = collate(examples, [[0, 1], [2]], PAD, "sdpa")
    assert b["input_ids"].shape == (2, 8)  # longest row 5, rounded up to 8
    assert b["input_ids"][0].tolist() == [10, 11, 12, 20, 21, PAD, PAD, PAD]
    # target of position i = label of token i + 1 of the same example; -100 at each last token
    assert b["target_ids"][0].tolist() == [11, 12, -100, 21, -100, -100, -100, -100]
    assert b["target_ids"][1].tolist() == [-100, 32, 33, -100, -100, -100, -100, -100]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    m = b["attention_mask"]
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    m0 = m[0, 0]
    assert m0[4].tolist() == [False, False, False, True, True, False, False, False]
    assert m0[2].tolist() == [True, True, True, False, False, False, False, False]
    assert m0[6].tolist() == [False] * 5 + [True, True, False]  # padding: its own block
    assert torch.equal(m.diagonal(dim1=-2, dim2=-1), torch.ones(2, 1, 8, dtype=torch.bool))
    assert not m0.triu(1).any()


def test_data_collate_unpacked():
    examples = [ex([1, 2, 3]), ex([4, 5])]
    b = collate(examples, [[0], [1]], PAD, "sdpa", pad_to_multiple_of=1)
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["attention_mask"].dtype == torch.long
    assert b["position_ids"][1, :2].tolist() == [0, 1]
    assert b["target_ids"].tolist() == [[2, 3, -100], [5, -100, -100]]


def test_data_collate_backends():
    examples = [ex([1, 2, 3]), ex([4, 5])]
    rows = [[0, 1]]
    assert collate(examples, rows, PAD, "flash_attention_2")["attention_mask"] is None
    eager = collate(examples, rows, PAD, "eager")["attention_mask"]
    sdpa = collate(examples, rows, PAD, "sdpa")["attention_mask"]
    assert eager.dtype == torch.float32 and torch.equal(eager == 0, sdpa)


def test_data_collate_flex_block_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    examples = [ex([1, 2, 3]), ex([4, 5]), ex([6, 7, 8, 9])]
    rows = [[0, 1], [2]]
    try:
        bm = collate(examples, rows, PAD, "flex_attention", device="cpu")["attention_mask"]
    except Exception as e:  # pragma: no cover - a torch build without CPU flex support
        pytest.skip(f"create_block_mask unavailable on CPU: {e}")
    from torch.nn.attention.flex_attention import BlockMask

    assert isinstance(bm, BlockMask)
    ref = collate(examples, rows, PAD, "sdpa")["attention_mask"]
    B, _, L, _ = ref.shape
    q = torch.arange(L)[:, None].expand(L, L)
    kv = torch.arange(L)[None, :].expand(L, L)
    for b in range(B):
        got = bm.mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
        assert torch.equal(got, ref[b, 0])


def _tiny_llama(vocab: int, attn: str):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    return model


def _examples(tok):
    convs = [
        [{"role": "user", "content": "Give three tips for staying healthy."},
         {"role": "assistant", "content": "Eat vegetables, sleep well and exercise."}],
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome"}],
        [{"role": "text", "content": "First Citizen: Before we proceed any further, hear me speak."}],
        [{"role": "user", "content": "Italy?"}, {"role": "assistant", "content": "Rome."}],
    ]
    return [tokenize_conversation(c, tok, "chat", 256, False, None)[0] for c in convs]


def _loss_sum(logits, targets):
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [True, False])
def test_data_packed_batch_equals_separate_runs(attn, packed):
    tok = make_tokenizer(CHATML)
    examples = _examples(tok)
    model = _tiny_llama(len(tok), attn)
    rows = [[0, 1], [2, 3, 4]] if packed else [[0], [1], [2], [3], [4]]
    batch = collate(examples, rows, tok.pad_token_id, attn)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False).logits
    assert torch.isfinite(out).all(), "padding rows must not produce NaN"
    packed_loss = _loss_sum(out, batch["target_ids"])
    sep_loss = torch.zeros(())
    n_targets = 0
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            ids = torch.tensor([examples[i]["input_ids"]])
            labels = torch.tensor([examples[i]["labels"]])
            with torch.no_grad():
                ref = model(input_ids=ids, use_cache=False).logits
            n = ids.shape[1]
            torch.testing.assert_close(out[r, pos : pos + n], ref[0], atol=1e-5, rtol=1e-5)
            sep_loss += _loss_sum(ref[:, :-1], labels[:, 1:])
            n_targets += int((labels[:, 1:] != -100).sum())
            pos += n
    assert int((batch["target_ids"] != -100).sum()) == n_targets
    torch.testing.assert_close(packed_loss, sep_loss, atol=1e-5, rtol=1e-6)


def test_data_plan_then_collate_covers_all_tokens():
    tok = make_tokenizer(CHATML)
    examples = _examples(tok) * 7
    lengths = [len(e["input_ids"]) for e in examples]
    plan = plan_micro_batches(lengths, 3, 128, True, False, seed=1, epoch=0)
    total = 0
    for rows in plan:
        b = collate(examples, rows, tok.pad_token_id, "sdpa")
        assert b["input_ids"].shape[1] <= 128
        total += int((b["target_ids"] != -100).sum())
    assert total == sum(sum(1 for l in e["labels"][1:] if l != -100) for e in examples)


def test_data_block_causal_mask_shape():
    seg = torch.tensor([[0, 0, 1, -1]])
    m = block_causal_mask(seg)
    assert m.shape == (1, 1, 4, 4)
    assert m[0, 0].tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]
