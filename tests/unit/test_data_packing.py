"""plan_micro_batches: deterministic in (seed, epoch), every example exactly once."""

from __future__ import annotations

import random

import pytest

from instructkit.data import pack_rows, plan_micro_batches


def lengths(n=203, seed=0, hi=100):
    r = random.Random(seed)
    return [r.randint(1, hi) for _ in range(n)]


def flat(plan):
    return [i for mb in plan for row in mb for i in row]


@pytest.mark.parametrize("packing,group", [(True, False), (False, True), (False, False)])
def test_data_plan_covers_every_example_once(packing, group):
    ls = lengths()
    plan = plan_micro_batches(ls, 4, 128, packing, group, seed=3, epoch=0)
    assert sorted(flat(plan)) == list(range(len(ls)))
    assert all(len(mb) == 4 for mb in plan[:-1]) and 1 <= len(plan[-1]) <= 4
    if packing:
        assert all(sum(ls[i] for i in row) <= 128 for mb in plan for row in mb)
    else:
        assert all(len(row) == 1 for mb in plan for row in mb)


@pytest.mark.parametrize("packing,group", [(True, False), (False, True), (False, False)])
def test_data_plan_deterministic_in_seed_and_epoch(packing, group):
    ls = lengths()
    a = plan_micro_batches(ls, 4, 128, packing, group, seed=3, epoch=1)
    assert a == plan_micro_batches(list(ls), 4, 128, packing, group, seed=3, epoch=1)
    assert a != plan_micro_batches(ls, 4, 128, packing, group, seed=3, epoch=2)
    assert a != plan_micro_batches(ls, 4, 128, packing, group, seed=4, epoch=1)


def test_data_packing_fills_rows():
    ls = lengths(500, hi=60)
    plan = plan_micro_batches(ls, 8, 256, True, False, seed=0, epoch=0)
    rows = [row for mb in plan for row in mb]
    fill = sum(ls) / (len(rows) * 256)
    assert fill > 0.95, fill
    assert any(len(r) > 1 for r in rows)


def test_data_pack_rows_best_fit():
    # 60 fits the row with 40 left exactly, not the one with 70 left
    rows = pack_rows([30, 60, 60], [0, 1, 2], 100)
    assert rows == [[0, 1], [2]]
    with pytest.raises(ValueError, match="more than max_seq_len"):
        pack_rows([101], [0], 100)


def test_data_group_by_length_reduces_padding():
    ls = lengths(2000, hi=500)

    def padding(plan):
        return sum(max(ls[r[0]] for r in mb) * len(mb) - sum(ls[r[0]] for r in mb) for mb in plan)

    grouped = plan_micro_batches(ls, 8, 512, False, True, seed=0, epoch=0)
    plain = plan_micro_batches(ls, 8, 512, False, False, seed=0, epoch=0)
    assert padding(grouped) < padding(plain) / 5
    # the order of batches is shuffled, not sorted by length
    firsts = [ls[mb[0][0]] for mb in grouped[:-1]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_data_plan_partial_last_batch_kept():
    plan = plan_micro_batches([5] * 10, 4, 8, False, True, seed=0, epoch=0)
    assert [len(mb) for mb in plan] == [4, 4, 2]
    assert plan_micro_batches([], 4, 8, True, False, seed=0, epoch=0) == []
