"""The STAR sequence batcher: K images per sequence, seeded and resumable mid-epoch, disjoint across ranks."""

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from star.data import StarBatchSampler, SyntheticImages, build_sequence_loader, collate_sequences

def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_deterministic_and_no_duplicates():
    sampler = StarBatchSampler(100, batch_size=8, images_per_seq=4, seed=3)
    batches = _epoch(sampler, 0)
    assert len(batches) == len(sampler) == 12  # 25 sequences of 4 -> 12 batches of 2 sequences (8 images)
    assert all(len(b) == 8 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) and all(0 <= i < 100 for i in flat)
    assert batches == _epoch(StarBatchSampler(100, 8, 4, seed=3), 0)
    assert batches != _epoch(sampler, 1)
    assert batches != _epoch(StarBatchSampler(100, 8, 4, seed=4), 0)
    assert _epoch(sampler, 0) == batches  # going back to an epoch replays it


def test_sampler_drop_last_false_keeps_whole_sequences():
    sampler = StarBatchSampler(10, batch_size=4, images_per_seq=2, drop_last=False)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2] and len(sampler) == 3
    assert len(list(StarBatchSampler(10, 4, 2, drop_last=True))) == 2


def test_sampler_resume_mid_epoch():
    full = _epoch(StarBatchSampler(96, 8, 4, seed=7), 2)
    interrupted = StarBatchSampler(96, 8, 4, seed=7)
    interrupted.set_epoch(2)
    it = iter(interrupted)
    seen = [next(it) for _ in range(5)]
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 5

    resumed = StarBatchSampler(96, 8, 4, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop re-enters the interrupted epoch
    rest = list(resumed)
    assert seen + rest == full
    assert resumed.state_dict()["batches_done"] == len(resumed)
    assert _epoch(resumed, 3) == _epoch(StarBatchSampler(96, 8, 4, seed=7), 3)  # later epochs are full

    explicit = StarBatchSampler(96, 8, 4, seed=7)
    explicit.load_state_dict(interrupted.state_dict(batches_done=3))  # what the loop consumed, not prefetched
    assert list(explicit) == full[3:]
    with pytest.raises(ValueError, match="batch_size"):
        StarBatchSampler(96, 16, 4, seed=7).load_state_dict(state)


def test_a_pass_can_span_epochs_and_resume_inside_one():
    epochs = [_epoch(StarBatchSampler(96, 8, 4, seed=7), e) for e in range(4)]
    spanning = StarBatchSampler(96, 8, 4, seed=7)
    spanning.set_epoch(1)
    spanning.span_epochs(3, batches_per_epoch=5)  # the loop consumes 5 of the 12 batches per epoch
    assert list(spanning) == epochs[1][:5] + epochs[2][:5] + epochs[3][:5]
    assert spanning.epoch == 3 and spanning.state_dict(batches_done=2, epoch=2)["epoch"] == 2

    resumed = StarBatchSampler(96, 8, 4, seed=7)
    resumed.load_state_dict(spanning.state_dict(batches_done=2, epoch=2))
    resumed.set_epoch(2)
    resumed.span_epochs(2, batches_per_epoch=5)
    assert list(resumed) == epochs[2][2:5] + epochs[3][:5]  # the resumed epoch's rest, then whole ones
    for bad, match in [((0,), "at least 1 epoch"), ((2, 13), r"batches_per_epoch must be in \[1, 12\]")]:
        with pytest.raises(ValueError, match=match):
            spanning.span_epochs(*bad)


def test_sampler_distributed_ranks_disjoint_and_covering():
    single = [i for b in _epoch(StarBatchSampler(96, 8, 4, seed=1), 5) for i in b]
    ranks = [StarBatchSampler(96, 8, 4, seed=1, num_replicas=3, rank=r) for r in range(3)]
    per_rank = [[i for b in _epoch(s, 5) for i in b] for s in ranks]
    assert len({len(s) for s in ranks}) == 1 and len(ranks[0]) == 4
    all_images = [i for images in per_rank for i in images]
    assert len(all_images) == len(set(all_images)) == 96
    sequences = lambda images: {tuple(images[i:i + 4]) for i in range(0, len(images), 4)}  # noqa: E731
    assert set().union(*map(sequences, per_rank)) == sequences(single)  # same sequences, split over ranks
    uneven = [StarBatchSampler(100, 8, 4, num_replicas=3, rank=r) for r in range(3)]
    assert len({len(list(s)) for s in uneven}) == 1  # 25 sequences: one dropped, never duplicated
    with pytest.raises(ValueError, match="rank"):
        StarBatchSampler(96, 8, 4, num_replicas=2, rank=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=8, images_per_seq=0), "K must be >= 1"),
    (dict(batch_size=6, images_per_seq=4), "multiple of K=4"),
    (dict(batch_size=4, images_per_seq=8), "K=8 images per sequence does not fit a batch of 4 images"),
    (dict(batch_size=128, images_per_seq=4), "smaller than one batch"),
])
def test_sampler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StarBatchSampler(100, **kwargs)


def test_sequence_loader_collates_sequences():
    dataset = SyntheticImages(48, img_size=8, in_chans=3, num_classes=4, seed=0, transform=T.ToTensor())
    loader = build_sequence_loader(dataset, batch_size=8, images_per_seq=4, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (2, 4, 3, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (2, 4) and labels.dtype == torch.int64
    first = [index for index, _ in next(iter(loader.batch_sampler))]  # (index, seed key) pairs
    assert labels.flatten().tolist() == [dataset.targets[i] for i in first]
    assert torch.equal(images[0, 1], dataset[first[1]][0])
    assert len(loader) == 6
    with pytest.raises(ValueError, match="K=4"):
        collate_sequences([dataset[0]] * 6, images_per_seq=4)
    with pytest.raises(TypeError, match="ToTensor"):
        collate_sequences([(Image.new("L", (8, 8)), 0)] * 4, images_per_seq=4)


def test_seeded_samples_draw_from_their_key_alone():
    """A sample's augmentation depends on its (seed, epoch, index) key, not on the RNG state it is loaded in
    (a worker's, however far it got), and loading it leaves the caller's RNG where it was."""
    flip = T.Compose([T.ToTensor(), T.RandomHorizontalFlip(), T.RandomResizedCrop(8, scale=(0.2, 1.0))])
    loader = build_sequence_loader(SyntheticImages(48, 8, 3, 4, transform=flip), batch_size=8, images_per_seq=4)
    sampler = loader.batch_sampler
    assert next(iter(sampler))[0][1] == f"0/0/{next(iter(sampler))[0][0]}"
    sampler.set_epoch(1)
    item = next(iter(sampler))[0]
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = loader.dataset[item][0]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    assert torch.equal(loader.dataset[item][0], first)
    assert not torch.equal(loader.dataset[(item[0], "0/2/" + str(item[0]))][0], first)  # another epoch's draw
