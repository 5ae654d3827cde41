"""tunesmith.data.collate: dynamic padding, padding-free batches and packing — position ids restarting at every
example, labels -100 on padding and at every example's first token, first-fit-decreasing rows. Packed rows read from
Arrow at scale: tests/test_scale.py; packed rows scored as if alone: tests/test_scoring.py."""
import random

import pytest

from tunesmith.data.collate import Collator, concat, first_fit_decreasing, pack
from tunesmith.data.tokenize import IGNORE


def test_collator_and_pack_layout():
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    rows = pack([a, b], max_length=8)
    assert len(rows) == 1
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert rows[0]["labels"] == [IGNORE, 6, 7, IGNORE, 9]  # no example is trained to follow the previous one
    batch = Collator(pad_token_id=3)(rows + [{"input_ids": [1], "labels": [1], "position_ids": [0]}])
    assert batch["input_ids"][1].tolist() == [1, 3, 3, 3, 3]
    assert batch["position_ids"][1].tolist() == [0, 0, 1, 2, 3]
    assert batch["token_mask"][1].tolist() == [1, 0, 0, 0, 0]
    assert "attention_mask" not in batch


def test_padding_free_joins_the_batch_into_one_row_with_a_boundary_at_each_example():
    batch = Collator(0, padding_free=True)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                            {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_packed_and_padding_free_batches_take_the_varlen_path():
    """FlashAttention's variable-length kernels are chosen by transformers from position_ids when no attention mask is
    given: tunesmith's packed and padding-free batches are exactly that."""
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = Collator(0, padding_free=True)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def linear_first_fit_decreasing(lengths, capacity):
    """The packing tunesmith shipped before: first-fit-decreasing with a linear scan over the bins."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, space = [], []
    for i in order:
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


@pytest.mark.parametrize("seed,capacity", [(0, 64), (1, 100), (2, 512), (3, 37)])
def test_tree_packing_gives_the_rows_of_linear_first_fit(seed, capacity):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, capacity), rng.randint(1, capacity // 4 + 1), capacity])
               for _ in range(3000)]
    lengths[10] = capacity + 5  # longer than a row: alone
    members, offsets = first_fit_decreasing(lengths, capacity)
    rows = [members[offsets[b]:offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]
    assert rows == linear_first_fit_decreasing(lengths, capacity)
    assert sorted(members.tolist()) == list(range(3000))


def test_a_padded_batch_masks_the_padding_and_keeps_the_prompt_labels():
    prompt_masked = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]}  # a 2-token prompt, then the answer
    short = {"input_ids": [9, 10], "labels": [IGNORE, 10]}
    batch = Collator(pad_token_id=3)([prompt_masked, short])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}  # no position ids: the model counts positions
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 3, 3]]  # right padding with the pad id
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 10, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_an_example_that_trains_its_first_token_does_not_train_it_after_another_in_a_row():
    rows = pack([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}], 8)
    assert rows[0]["labels"] == [IGNORE, 6, IGNORE, 8, 9]  # neither 5 after nothing nor 7 after 6
    assert concat([{"input_ids": [5], "labels": [5]}])["labels"] == [IGNORE]


def test_packed_rows_index_like_a_sequence():
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 4, 2, 6], start=1)]
    rows = pack(examples, max_length=8)
    assert len(rows) == 3 and rows.fill == pytest.approx(20 / 24)
    assert rows[-1] == rows[len(rows) - 1] and rows[0:2] == [rows[0], rows[1]] and list(rows) == rows[:]
    assert sorted(x for r in rows for x in r["input_ids"]) == sorted(x for e in examples for x in e["input_ids"])
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    with pytest.raises(IndexError):
        rows[3]
    assert pack([], 8).fill == 0.0 and len(pack([], 8)) == 0
