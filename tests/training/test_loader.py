"""The input pipeline: epochs of a DistributedSampler split across ranks, workers, resume at any step, data wait."""
import os

import pytest
import torch
from torch.utils.data import Dataset

from movq_deploy.training.data import embedded_data
from movq_deploy.training.loader import TimedBatches, TrainBatches


class Probe(Dataset):
    """Index i -> (i, the pid of the process that produced it); any i >= 0 is valid, like the crop datasets."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), torch.tensor(os.getpid())


def take(batches, count):
    out, it = [], iter(batches)
    for _ in range(count):
        out.append(next(it))
    return out


def test_ranks_split_each_epoch_and_epochs_draw_fresh_indices():
    n, batch = 20, 3  # 10 samples per rank and epoch, 3 batches of 3 (drop_last)
    per_rank = [[b[0].tolist() for b in take(TrainBatches(Probe(n), batch, rank=r, world_size=2, seed=5), 6)]
                for r in (0, 1)]
    for epoch in (0, 1):
        seen = [i for r in (0, 1) for b in per_rank[r][3 * epoch:3 * epoch + 3] for i in b]
        assert len(set(seen)) == 18  # no index twice within an epoch, across both ranks
        assert all(epoch * n <= i < (epoch + 1) * n for i in seen)  # epoch e draws e*N + i: fresh crops
    assert sorted(i % n for i in sum(per_rank[0][:3], [])) != sorted(i % n for i in sum(per_rank[0][3:], []))


def test_resume_at_a_step_continues_the_same_stream():
    straight = take(TrainBatches(Probe(23), 4, rank=1, world_size=2, seed=0, batches_per_step=2), 12)
    for start_step in (1, 2, 3):  # 2 batches per step; 2 full batches per epoch for this rank, so steps cross epochs
        resumed = take(TrainBatches(Probe(23), 4, rank=1, world_size=2, seed=0, start_step=start_step,
                                    batches_per_step=2), 4)
        assert [b[0].tolist() for b in resumed] == [b[0].tolist() for b in straight[2 * start_step:2 * start_step + 4]]


def test_workers_decode_the_same_crops_and_persist_across_epochs():
    crops = embedded_data(32).train_set(seed=0, length=12)
    in_process = take(TrainBatches(crops, 4, seed=1), 6)
    with_workers = take(TrainBatches(crops, 4, seed=1, workers=2), 6)  # 3 batches per epoch: two epochs
    for (a, la), (b, lb) in zip(in_process, with_workers):
        assert torch.equal(a, b) and torch.equal(la, lb)
    pids = {int(p) for b in take(TrainBatches(Probe(12), 4, workers=2), 9) for p in b[1]}  # three epochs
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, the same ones every epoch


def test_data_wait_is_timed():
    timed = TimedBatches(TrainBatches(Probe(8), 2))
    index, _ = timed.next(torch.device("cpu"))
    assert index.shape == (2,) and timed.take_wait() > 0 and timed.take_wait() == 0


def test_batch_larger_than_a_rank_share_is_one_line():
    with pytest.raises(ValueError, match="--batch-size 8 is larger than this rank's share of the 10 training"):
        TrainBatches(Probe(10), 8, rank=0, world_size=2)
