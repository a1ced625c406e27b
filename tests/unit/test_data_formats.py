"""to_conversations: each format, auto-detection, field remapping, errors, the real oasst file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.data import detect_format, load_records, to_conversations
from instructkit.errors import DataError

REPO = Path(__file__).resolve().parents[2]
OASST = [REPO / "data" / "oasst_en100_trees.jsonl", Path("/work/shared/data/oasst_en100_trees.jsonl")]
SELF_INSTRUCT = REPO / "data" / "selfinstruct_seed_tasks.jsonl"


def plain(conv):
    return [(m["role"], m["content"]) for m in conv]


def test_data_alpaca():
    recs = [
        {"instruction": "Add", "input": "1 2", "output": " 3 "},
        {"instruction": "Say hi", "input": "", "output": "Hi!"},
    ]
    convs = to_conversations(recs, "alpaca", {}, "a.jsonl")
    assert plain(convs[0]) == [("user", "Add\n\n1 2"), ("assistant", "3")]
    assert convs[0][0]["instruction"] == "Add" and convs[0][0]["input"] == "1 2"
    assert plain(convs[1]) == [("user", "Say hi"), ("assistant", "Hi!")]
    assert "input" not in convs[1][0]


def test_data_dolly():
    recs = [{"instruction": "Summarize", "context": "A long text.", "response": "Short.", "category": "x"}]
    assert detect_format(recs[0]) == "dolly"
    convs = to_conversations(recs, "auto", {}, "d.jsonl")
    assert plain(convs[0]) == [("user", "Summarize\n\nA long text."), ("assistant", "Short.")]


def test_data_self_instruct_one_conversation_per_instance():
    recs = [{"instruction": "Antonym?", "instances": [
        {"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}]}]
    convs = to_conversations(recs, "auto", {}, "s.jsonl")
    assert [plain(c) for c in convs] == [
        [("user", "Antonym?\n\nhot"), ("assistant", "cold")],
        [("user", "Antonym?\n\nup"), ("assistant", "down")],
    ]


def test_data_self_instruct_real_file():
    if not SELF_INSTRUCT.is_file():
        pytest.skip("data/selfinstruct_seed_tasks.jsonl absent")
    recs = load_records(str(SELF_INSTRUCT))
    stats = {}
    convs = to_conversations(recs, "auto", {}, str(SELF_INSTRUCT), stats=stats)
    assert stats["format"] == "self_instruct"
    n_instances = sum(len(r["instances"]) for r in recs)
    assert len(convs) + stats["n_dropped_empty"] == n_instances
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in convs)


def test_data_messages():
    recs = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
        {"role": "assistant", "content": "Bye."},
    ]}]
    convs = to_conversations(recs, "auto", {}, "m.jsonl")
    assert plain(convs[0]) == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."),
                               ("user", "Bye"), ("assistant", "Bye.")]


def test_data_sharegpt():
    recs = [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}, {"from": "human", "value": "Q3"}]}]
    assert detect_format(recs[0]) == "sharegpt"
    convs = to_conversations(recs, "auto", {}, "g.json")
    # the trailing question with no answer is dropped
    assert plain(convs[0]) == [("system", "S"), ("user", "Q1"), ("assistant", "A1"),
                               ("user", "Q2"), ("assistant", "A2")]


def test_data_sharegpt_unknown_role():
    recs = [{"conversations": [{"from": "alien", "value": "x"}]}]
    with pytest.raises(DataError, match=r"g\.json, record 1: unknown role 'alien'"):
        to_conversations(recs, "sharegpt", {}, "g.json")


def test_data_text():
    convs = to_conversations([{"text": "Once upon a time."}, {"text": "  "}], "auto", {}, "t.txt")
    assert convs == [[{"role": "text", "content": "Once upon a time."}]]


def test_data_fields_remap_and_auto_detect():
    recs = [{"question": "2+2?", "answer": "4"}]
    fields = {"instruction": "question", "output": "answer"}
    assert detect_format(recs[0], fields) == "alpaca"
    convs = to_conversations(recs, "auto", fields, "gsm.jsonl")
    assert plain(convs[0]) == [("user", "2+2?"), ("assistant", "4")]


def test_data_missing_field_names_field_record_file_and_fields_found():
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]
    with pytest.raises(DataError) as e:
        to_conversations(recs, "alpaca", {}, "/x/data.jsonl")
    msg = str(e.value)
    assert "data.jsonl" in msg and "record 2" in msg and "'output'" in msg
    assert "fields found: instruction, answer" in msg


def test_data_missing_remapped_field_says_which_key():
    recs = [{"q": "a", "out": "b"}]
    with pytest.raises(DataError, match=r"missing field 'instruction' \(read from key 'question'"):
        to_conversations(recs, "alpaca", {"instruction": "question", "output": "out"}, "f.csv")


def test_data_auto_detect_failure_lists_keys():
    with pytest.raises(DataError, match=r"cannot tell the data format.*chosen, rejected"):
        to_conversations([{"chosen": "x", "rejected": "y"}], "auto", {}, "hh.jsonl")


def test_data_empty_answers_dropped_and_counted():
    recs = [
        {"instruction": "a", "output": ""},
        {"instruction": "b", "output": "   "},
        {"instruction": "c", "output": None},
        {"instruction": "d", "output": "ok"},
    ]
    stats = {}
    convs = to_conversations(recs, "alpaca", {}, "a.jsonl", stats=stats)
    assert len(convs) == 1 and stats["n_dropped_empty"] == 3


def test_data_messages_cut_at_empty_answer():
    recs = [{"messages": [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": ""}]}]
    convs = to_conversations(recs, "messages", {}, "m.jsonl")
    assert plain(convs[0]) == [("user", "Q1"), ("assistant", "A1")]


def _tree(text, role, rank=None, replies=(), deleted=False):
    node = {"text": text, "role": role, "replies": list(replies), "deleted": deleted}
    if rank is not None or role == "assistant":
        node["rank"] = rank
    return node


def test_data_oasst_best_ranked_path():
    tree = {"message_tree_id": "t", "prompt": _tree("Q", "prompter", replies=[
        _tree("A-second", "assistant", 1),
        _tree("A-unranked", "assistant", None),
        _tree("A-best", "assistant", 0, replies=[
            _tree("Q2-worse", "prompter", 2),
            _tree("Q2-deleted", "prompter", 0, deleted=True),
            _tree("Q2", "prompter", 1, replies=[_tree("A2", "assistant", None)]),
        ]),
    ])}
    convs = to_conversations([tree], "auto", {}, "o.jsonl")
    assert plain(convs[0]) == [("user", "Q"), ("assistant", "A-best"), ("user", "Q2"), ("assistant", "A2")]


def test_data_oasst_flat_rows():
    rows = [
        {"message_id": "1", "parent_id": None, "text": "Q", "role": "prompter", "rank": None},
        {"message_id": "2", "parent_id": "1", "text": "A-bad", "role": "assistant", "rank": 1},
        {"message_id": "3", "parent_id": "1", "text": "A-good", "role": "assistant", "rank": 0},
    ]
    convs = to_conversations(rows, "auto", {}, "oasst1")
    assert plain(convs[0]) == [("user", "Q"), ("assistant", "A-good")]


def test_data_oasst_real_file():
    path = next((p for p in OASST if p.is_file()), None)
    if path is None:
        pytest.skip("no oasst_en100_trees.jsonl")
    recs = load_records(str(path))
    stats = {}
    convs = to_conversations(recs, "auto", {}, str(path), stats=stats)
    assert stats["format"] == "oasst"
    assert len(convs) + stats["n_dropped_empty"] == len(recs) and len(convs) >= 95
    for conv, rec in zip(convs, recs):
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:])), "turns alternate"
        assert conv[0]["content"] == rec["prompt"]["text"].strip()
    # the first tree: a prompt with three ranked leaves -> the rank-0 reply
    first = recs[0]["prompt"]
    best = min(first["replies"], key=lambda r: r["rank"])
    assert convs[0][1]["content"] == best["text"].strip()


def test_data_oasst_follows_rank_zero_at_each_level():
    path = next((p for p in OASST if p.is_file()), None)
    if path is None:
        pytest.skip("no oasst_en100_trees.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    convs = to_conversations(recs, "oasst", {}, str(path))
    deep = [(c, r) for c, r in zip(convs, recs) if len(c) >= 4]
    assert deep, "some trees go several turns deep"
    conv, rec = deep[0]
    node = rec["prompt"]
    for msg in conv[1:]:
        ranked = [r for r in node["replies"] if r.get("rank") is not None and not r.get("deleted")]
        node = min(ranked, key=lambda r: r["rank"]) if ranked else node["replies"][0]
        assert msg["content"] == node["text"].strip()
