"""PackedLoader: batch format, document boundaries, and every document read once across ranks x workers."""

import numpy as np
import pytest
import torch

from undertow.pretrain.loader import PackedLoader
from undertow.pretrain.loader.packing import Row, pack_rows
from undertow.pretrain.loader.streams import DocumentStream, PlanItem, StreamSettings, slot_plan
from undertow.pretrain.loader.sources import resolve_source
from tests.pretrain.loader_data import (
    document_multiset,
    documents_from_batches,
    random_documents,
    write_shard_dir,
)


def slot_documents(loader: PackedLoader) -> list[list[np.ndarray]]:
    return [documents_from_batches(loader.iter_slot(s)) for s in range(loader.num_slots)]


def test_pack_rows_spells_out_the_format():
    rows = [Row([np.array([5, 6, 7]), np.array([8, 9])], next_token=10), Row([np.array([3, 4])])]
    batch = pack_rows(rows, seq_len=5, batch_size=3, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, -100, 9, 10], [4, -100, -100, -100, -100], [-100] * 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 7, 10, 15]
    assert batch["max_seqlen"] == 5
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["doc_ids"].dtype == batch["cu_seqlens"].dtype == torch.int32


def check_batch(batch: dict, batch_size: int, seq_len: int) -> None:
    """Invariants every batch satisfies, derived independently of the packing code (pad id 0 never
    occurs in test documents)."""
    ids, labels, pos, docs, cu = (batch[k] for k in ("input_ids", "labels", "position_ids", "doc_ids", "cu_seqlens"))
    assert ids.shape == labels.shape == pos.shape == docs.shape == (batch_size, seq_len)
    lengths = []
    for b in range(batch_size):
        d = docs[b].tolist()
        assert d[0] == 0 and all(y - x in (0, 1) for x, y in zip(d, d[1:]))
        starts = [t for t in range(seq_len) if t == 0 or d[t] != d[t - 1]]
        lengths += [e - s for s, e in zip(starts, starts[1:] + [seq_len])]
        for t in range(seq_len):
            assert pos[b, t] == (0 if t in starts else pos[b, t - 1] + 1)
            if t + 1 < seq_len:  # inside a row: the next token of the same segment, else masked
                same = d[t + 1] == d[t] and ids[b, t] != 0
                assert labels[b, t] == (ids[b, t + 1] if same else -100)
    assert cu.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert cu[-1] == batch_size * seq_len and batch["max_seqlen"] == max(lengths)


def test_rows_keep_document_boundaries_and_overlap_by_one_token(tmp_path):
    docs = random_documents(25, seed=1, max_len=30)
    write_shard_dir(str(tmp_path), docs, [9, 9, 7])
    loader = PackedLoader([str(tmp_path)], seq_len=16, batch_size=3)
    batches = [b for _, b in zip(range(30), loader.iter_slot(0))]  # 1440 tokens: about 3 epochs
    for batch in batches:
        check_batch(batch, 3, 16)
        assert (batch["input_ids"] != 0).all()  # a looping run never pads
    rebuilt = documents_from_batches(batches)  # also checks each row's last label starts the next row
    known = set(document_multiset(docs))
    assert len(rebuilt) > 2 * len(docs)
    assert all(tuple(d) in known for d in rebuilt[:-1])  # the last one may be cut by the end of the sample
    assert document_multiset(rebuilt[: len(docs)]) == document_multiset(docs)  # first epoch: each once


@pytest.mark.parametrize(
    "shard_sizes, world_size, num_workers",
    [
        ([5, 3, 8, 1, 6, 4, 2], 2, 2),  # 7 shards over 4 slots: uneven, some split at document level
        ([12, 9], 3, 2),  # fewer shards than slots
        ([20], 1, 3),  # a single shard
        ([4, 4, 4, 4, 4], 4, 0),  # 5 shards, 4 ranks without workers
    ],
)
def test_every_document_is_read_once_across_ranks_and_workers(tmp_path, shard_sizes, world_size, num_workers):
    docs = random_documents(sum(shard_sizes), seed=2)
    write_shard_dir(str(tmp_path), docs, shard_sizes)
    loader = PackedLoader(
        [str(tmp_path)], seq_len=8, batch_size=2, world_size=world_size, num_workers=num_workers, loop=False
    )
    assert loader.num_slots == world_size * max(1, num_workers)
    per_slot = slot_documents(loader)
    assert document_multiset(d for slot in per_slot for d in slot) == document_multiset(docs)
    assert all(per_slot)  # every slot got work


def test_shard_plans_are_pinned():
    """Saved loader states index into these plans: changing them would break resuming old runs."""
    plans = [slot_plan(7, 3, slot, seed=0, source_index=0, epoch=1) for slot in range(3)]
    assert plans == [
        [PlanItem(0, 1, 0), PlanItem(5, 1, 0), PlanItem(2, 3, 0)],
        [PlanItem(4, 1, 0), PlanItem(1, 1, 0), PlanItem(2, 3, 1)],
        [PlanItem(3, 1, 0), PlanItem(6, 1, 0), PlanItem(2, 3, 2)],
    ]


def test_each_epoch_is_a_new_partition(tmp_path):
    docs = random_documents(30, seed=3)
    write_shard_dir(str(tmp_path), docs, [6, 6, 6, 6, 6])
    shards = resolve_source(str(tmp_path), "sources[0]")
    settings = StreamSettings(num_slots=3, seed=7, split="train", val_fraction=0.0, shuffle_documents=True, loop=True)
    orders = {}
    for slot in range(3):
        stream = DocumentStream(shards, 0, slot, settings)
        while stream.epoch < 3:
            tokens = stream.remaining().copy()  # may move on to the next epoch
            epoch = stream.epoch
            stream.consume(len(tokens))
            orders.setdefault(epoch, []).append(tokens)
        stream.close()
    for epoch in range(3):  # (orders[3] holds the first document of the next epoch per slot)
        assert document_multiset(orders[epoch]) == document_multiset(docs)
    assert [len(d) for d in orders[0]] != [len(d) for d in orders[1]]  # reshuffled


def test_one_pass_pads_only_the_end(tmp_path):
    docs = random_documents(17, seed=4)
    write_shard_dir(str(tmp_path), docs, [17])
    loader = PackedLoader([str(tmp_path)], seq_len=10, batch_size=4, loop=False)
    batches = list(loader)
    for batch in batches:
        check_batch(batch, 4, 10)
    assert all((b["input_ids"] != 0).all() for b in batches[:-1])
    real = sum(int((b["input_ids"] != 0).sum()) for b in batches)
    assert real == sum(len(d) for d in docs)
    assert list(loader) == []  # a finished one-pass train loader stays finished


def test_a_slot_without_documents_is_an_error_not_a_hang(tmp_path):
    write_shard_dir(str(tmp_path), random_documents(3, seed=5), [3])
    loader = PackedLoader([str(tmp_path)], seq_len=4, batch_size=1, world_size=4)
    assert next(loader.iter_slot(2))["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="gives slot 3 no train document in epoch 0"):
        next(loader.iter_slot(3))
