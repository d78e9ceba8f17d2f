"""Deterministic index subsets: a holdout split for model selection and class-balanced label fractions."""

import numpy as np
from torch.utils.data import Subset


def train_val_split(num_samples: int, val_size, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split range(num_samples) into (train_idx, val_idx), both sorted, with a seeded shuffle.

    `val_size` is a count (int) or a fraction of num_samples (float in (0, 1)). Selecting a model on a
    holdout of the training set keeps the official test split untouched for the final number.
    """
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in (0, 1), got {val_size}")
        val_size = round(val_size * num_samples)
    if not 0 < val_size < num_samples:
        raise ValueError(f"val_size must leave both splits non-empty: got {val_size} of {num_samples} samples")
    order = np.random.default_rng(seed).permutation(num_samples)
    return sorted(order[val_size:].tolist()), sorted(order[:val_size].tolist())


def label_subset(targets, fraction: float, seed: int = 0) -> list[int]:
    """Sorted indices of a class-balanced `fraction` of the labelled samples (the 1% / 10% label protocols).

    Each class keeps round(fraction * its count) samples, at least one, chosen by a seeded shuffle, so the
    subset has the same class proportions as the full set and is identical across runs.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        count = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=count, replace=False))
    return sorted(np.concatenate(keep).tolist())


class LabeledSubset(Subset):
    """torch Subset that keeps `.classes` and `.targets`, so subsets pass wherever a full dataset does."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]
