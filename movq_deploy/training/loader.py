"""The training input pipeline: a DataLoader over epochs of a DistributedSampler, resumable at any step, timed.

Every training dataset here names its samples by index, and any index >= 0 is valid (a crop is a function of
(seed, index): data.RandomCrops, folder.FolderCrops). Epoch e of rank r is the DistributedSampler's share of a
permutation of range(N) (shuffled with seed + e, `drop_last`, so every rank gets as many samples), offset by e * N
so that each epoch draws fresh crops. Batches are cut from that stream; `--workers` processes decode and crop
ahead of the step (pinned memory on CUDA, workers kept alive across epochs).

Resume: the step fixes the position in the stream, so a run resumed with the same world size sees exactly the
batches of the uninterrupted run. With another world size the step count, the schedule and the epoch go on, and
the samples are that world size's shuffle from there on (any world size reads the same checkpoint).
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """DistributedSampler whose epoch e yields e * N + i (N = len(dataset)), starting `skip` samples in."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        for position, i in enumerate(super().__iter__()):
            if position >= self.skip:
                yield offset + i

    def __len__(self) -> int:
        return self.num_samples - self.skip


class TrainBatches:
    """Endless (images, labels) batches for steps start_step, start_step + 1, ... of one rank.

    batch_size: samples per batch of this rank; a step may consume several batches (gradient accumulation), so
    the position of step s is s * batches_per_step batches into the stream.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 workers: int = 0, pin_memory: bool = False, start_step: int = 0, batches_per_step: int = 1,
                 prefetch_factor: int = 4):
        self.sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                    drop_last=True)
        self.batches_per_epoch = self.sampler.num_samples // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"--batch-size {batch_size} is larger than this rank's share of the "
                             f"{len(dataset)} training images ({self.sampler.num_samples} with {world_size} ranks)")
        self.batch_size = batch_size
        self.start_batch = start_step * batches_per_step
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                                 prefetch_factor=prefetch_factor if workers > 0 else None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, batch_in_epoch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.skip = batch_in_epoch * self.batch_size
            yield from self.loader
            epoch, batch_in_epoch = epoch + 1, 0


class TimedBatches:
    """Wraps a batch iterator and adds up the time spent waiting for it (the data-wait time of the log)."""

    def __init__(self, batches):
        self.iterator = iter(batches)
        self.wait_s = self.total_wait_s = 0.0
        self.first_call: "float | None" = None

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch on `device` (asynchronous copy from pinned memory on CUDA)."""
        tic = time.perf_counter()
        self.first_call = self.first_call or tic
        images, labels = next(self.iterator)
        wait = time.perf_counter() - tic
        self.wait_s += wait
        self.total_wait_s += wait
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def wait_share(self) -> float:
        """Share of the time since the first batch was asked for spent waiting for batches."""
        return self.total_wait_s / max(1e-9, time.perf_counter() - self.first_call) if self.first_call else 0.0

    def take_wait(self) -> float:
        """Seconds waited since the last call."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait


def default_workers(device: torch.device) -> int:
    """--workers default: 2 on the CPU (the cores also run the step), 8 per GPU process."""
    return 8 if device.type == "cuda" else 2



def training_batches(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                     workers: "int | None", device: torch.device, start_step: int = 0, batches_per_step: int = 1):
    """This rank's endless training batches: TrainBatches over an indexed dataset, or the stream of tar shards.
    workers None: default_workers(device); pinned memory on CUDA."""
    from torch.utils.data import IterableDataset

    workers = default_workers(device) if workers is None else workers
    pin = device.type == "cuda"
    if isinstance(dataset, IterableDataset):
        from movq_deploy.training.shards import shard_batches

        return shard_batches(dataset, batch_size, rank, start_step, workers, pin)
    return TrainBatches(dataset, batch_size, rank, world_size, seed, workers, pin, start_step, batches_per_step)


def first_crops(dataset: Dataset, count: int, batch_size: int, workers: int = 0):
    """Crops 0 .. count-1 of an indexed dataset (the first `count` of a shard stream), decoded by `workers`
    processes, `batch_size` at a time: yields float [b, 3, S, S] in [-1, 1] and int64 labels [b]."""
    from torch.utils.data import IterableDataset, Subset

    source = dataset if isinstance(dataset, IterableDataset) else Subset(dataset, range(count))
    have = 0
    for x, y in DataLoader(source, batch_size=max(1, min(batch_size, count)), num_workers=workers):
        take = min(len(x), count - have)
        yield x[:take], torch.as_tensor(y)[:take].long()
        have += take
        if have >= count:
            return
