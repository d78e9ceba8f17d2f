"""STAR batching: images are grouped into sequences of K distinct images, sequences into batches.

Batch size counts IMAGES (as in the paper's recipe), so a batch of B images holds B // K sequences
and the per-image learning-rate scaling stays the same for any K. Each epoch is a seeded permutation
(seed + epoch) cut into sequences, and the sequences into consecutive batches; with N ranks, global
batch i is batches i*N .. i*N+N-1 and rank r takes the r-th of them. So N ranks with batch B see
exactly what one process with batch B and N-fold gradient accumulation sees, and the position in an
epoch is a number of sequences, which lets a run resume on a different number of ranks.

Augmentation randomness is made just as resumable: `build_sequence_loader` seeds every sample from
(seed, epoch, index) (`SeededSamples`), so what a sample draws does not depend on which DataLoader
worker loads it or on how far that worker's RNG had got, and a resumed run, whose workers start
afresh, draws what the uninterrupted run drew.
"""

import functools
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def _check_sizes(batch_size: int, images_per_seq: int) -> None:
    if images_per_seq < 1:
        raise ValueError(f"images per sequence K must be >= 1, got K={images_per_seq}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 image, got {batch_size}")
    if images_per_seq > batch_size:
        raise ValueError(f"K={images_per_seq} images per sequence does not fit a batch of {batch_size} images")
    if batch_size % images_per_seq:
        raise ValueError(
            f"batch size ({batch_size} images) must be a multiple of K={images_per_seq} images per sequence; "
            f"e.g. {batch_size - batch_size % images_per_seq} or {batch_size + images_per_seq - batch_size % images_per_seq}"
        )


class StarBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices, `batch_size` images = `batch_size // K` sequences of K images.

    The indices of one sequence are contiguous in the batch (see `collate_sequences`). With
    `num_replicas` > 1 (default: the torch.distributed world, if initialised) rank r takes every
    num_replicas-th batch starting at r, so all ranks yield equally many batches of disjoint
    sequences; the tail that does not fill a global batch is dropped (drop_last) or split evenly over
    the ranks, never duplicated. Call `set_epoch(e)` before each epoch, as with DistributedSampler,
    or every epoch repeats the same order. len() is always a full epoch's batches (what LR schedules
    need), also while a resumed epoch yields only its remaining batches. With `sample_seeds` each index
    comes as (index, key), the key naming the seed, epoch and index, for `SeededSamples`. `span_epochs`
    makes one iter() run through several epochs, so that one DataLoader iterator serves a whole run.
    """

    def __init__(self, num_images, batch_size, images_per_seq, seed=0, drop_last=True, num_replicas=None, rank=None,
                 sample_seeds=False):
        _check_sizes(batch_size, images_per_seq)
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_images = num_images
        self.batch_size = batch_size
        self.images_per_seq = images_per_seq
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.sample_seeds = sample_seeds
        self.seqs_per_batch = batch_size // images_per_seq
        self.num_sequences = num_images // images_per_seq
        if self.num_sequences // num_replicas < self.seqs_per_batch:
            raise ValueError(
                f"dataset of {num_images} images is smaller than one batch of {batch_size} images "
                f"(K={images_per_seq}) per rank on {num_replicas} rank(s)"
            )
        self.epoch = 0
        self._start_batch = 0  # where the next pass begins (non-zero only right after a resume)
        self._batches_yielded = 0
        self._span = (1, None)  # epochs per iter(), batches taken from each (None: all)

    def __len__(self):
        full, rest = divmod(self.num_sequences, self.seqs_per_batch * self.num_replicas)
        return full + int(rest >= self.num_replicas and not self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; keeps a pending resume offset only for the resumed epoch."""
        if epoch != self.epoch:
            self._start_batch = 0
        self.epoch = epoch

    def _rank_batches(self) -> list[torch.Tensor]:
        """This rank's batches of the current epoch, each (sequences, K) image indices."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_images, generator=generator)
        sequences = order[: self.num_sequences * self.images_per_seq].view(self.num_sequences, self.images_per_seq)
        per_step = self.seqs_per_batch * self.num_replicas
        num_full = self.num_sequences // per_step
        full = sequences[: num_full * per_step].view(num_full, self.num_replicas, self.seqs_per_batch, -1)
        batches = list(full[:, self.rank])
        if len(self) > num_full:  # the tail, split evenly over the ranks
            tail = sequences[num_full * per_step:]
            share = len(tail) // self.num_replicas
            batches.append(tail[self.rank * share:(self.rank + 1) * share])
        return batches

    def span_epochs(self, epochs: int, batches_per_epoch: int | None = None) -> None:
        """Make the next iter() yield `epochs` epochs back to back, from the current one, each cut to its first
        `batches_per_epoch` batches (the ones a training loop consumes).

        A DataLoader's workers then load the next epoch's first batches while the current epoch's last ones
        train; with one iter() per epoch the loop waits at every epoch start for a worker to load a whole
        batch. The sampler's `epoch` runs ahead of the loop by the prefetch depth, so a loop saving its
        position passes its own epoch and batch count to `state_dict`.
        """
        if epochs < 1:
            raise ValueError(f"a pass spans at least 1 epoch, got {epochs}")
        if batches_per_epoch is not None and not 1 <= batches_per_epoch <= len(self):
            raise ValueError(f"batches_per_epoch must be in [1, {len(self)}], got {batches_per_epoch}")
        self._span = (epochs, batches_per_epoch)

    def __iter__(self):
        epochs, per_epoch = self._span
        for n in range(epochs):
            if n:
                self.epoch += 1
            start, self._start_batch = self._start_batch, 0
            batches = self._rank_batches()[:per_epoch]
            self._batches_yielded = start
            for batch in batches[start:]:
                self._batches_yielded += 1
                indices = batch.flatten().tolist()
                yield [(i, f"{self.seed}/{self.epoch}/{i}") for i in indices] if self.sample_seeds else indices

    def state_dict(self, batches_done: int | None = None, epoch: int | None = None) -> dict:
        """Position in the epoch, for resuming mid-epoch.

        With DataLoader workers the sampler runs ahead of the training loop by the prefetch depth, so
        pass `batches_done` = the number of batches the loop has actually consumed this epoch (and, for
        a pass that spans epochs, the loop's `epoch`); without them the sampler's own position is stored
        (exact for num_workers=0). `sequences_done` counts the sequences all ranks together consumed: the
        world-size-free position.
        """
        batches_done = self._batches_yielded if batches_done is None else batches_done
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done must be in [0, {len(self)}], got {batches_done}")
        return {
            "epoch": self.epoch if epoch is None else epoch,
            "batches_done": batches_done,
            "sequences_done": min(batches_done * self.seqs_per_batch * self.num_replicas, self.num_sequences),
            "seed": self.seed,
            "num_images": self.num_images,
            "batch_size": self.batch_size,
            "images_per_seq": self.images_per_seq,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next pass over epoch `state["epoch"]` starts after the sequences already done.

        The state may come from a run on another number of ranks (or another per-rank batch size):
        the epoch's sequence order is the same, so this run continues at the same sequence as long as
        that is a whole number of its own global batches. `state_dict()["batches_done"]` then says
        where, in this run's batches.
        """
        for key in ("seed", "num_images", "images_per_seq"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: sampler state has {key}={state[key]} but this run has {getattr(self, key)}; "
                    "the remaining batches would differ from the interrupted run"
                )
        per_step = self.seqs_per_batch * self.num_replicas
        start, rest = divmod(state["sequences_done"], per_step)
        if rest and state["sequences_done"] < self.num_sequences:
            raise ValueError(
                f"cannot resume: {state['sequences_done']} sequences of epoch {state['epoch']} were consumed (batch_size="
                f"{state['batch_size']} on {state['num_replicas']} rank(s)), not a whole number of this run's global "
                f"batches (batch_size={self.batch_size} images on {self.num_replicas} rank(s) = {per_step} sequences)"
            )
        self.epoch = state["epoch"]
        self._start_batch = self._batches_yielded = min(start + bool(rest), len(self))


class SeededSamples(Dataset):
    """`dataset` indexed by (index, key) pairs (`StarBatchSampler(sample_seeds=True)`): each sample is loaded with
    Python's, NumPy's and torch's CPU RNGs seeded from `key` alone, and the caller's RNG states are restored
    after, so loading in the main process leaves the training RNG untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    @property
    def classes(self):
        return self.dataset.classes

    @property
    def targets(self):
        return self.dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, key = item
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(key)
        np.random.seed(random.getrandbits(32))
        torch.default_generator.manual_seed(random.getrandbits(63))  # not torch.manual_seed: it seeds CUDA too
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def collate_sequences(samples, images_per_seq):
    """List of B*K (image tensor, label) -> images (B, K, C, H, W) and labels (B, K)."""
    if len(samples) % images_per_seq:
        raise ValueError(f"{len(samples)} samples cannot be cut into sequences of K={images_per_seq} images")
    if not isinstance(samples[0][0], torch.Tensor):
        raise TypeError(
            f"samples must be image tensors, got {type(samples[0][0]).__name__}; "
            "give the dataset a transform that ends in ToTensor/Normalize"
        )
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    return images.view(-1, images_per_seq, *images.shape[1:]), labels.view(-1, images_per_seq)


def build_sequence_loader(dataset, batch_size, images_per_seq, seed=0, num_workers=0, drop_last=True,
                          pin_memory=False, num_replicas=None, rank=None, **loader_kwargs) -> DataLoader:
    """DataLoader yielding STAR batches; `loader.batch_sampler` gives set_epoch / state_dict / load_state_dict.

    Samples are seeded (`SeededSamples`) and the loader draws its workers' base seed from a generator of its
    own, so neither loading nor starting workers moves the global RNG. `collate_fn` defaults to
    `collate_sequences`; classification (K=1) passes torch's default collate for (B, C, H, W) batches."""
    sampler = StarBatchSampler(len(dataset), batch_size, images_per_seq, seed=seed, drop_last=drop_last,
                               num_replicas=num_replicas, rank=rank, sample_seeds=True)
    loader_kwargs.setdefault("collate_fn", functools.partial(collate_sequences, images_per_seq=images_per_seq))
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),
        **loader_kwargs,
    )
