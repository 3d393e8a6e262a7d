"""The paired source/target loader: each iteration t gets `batch.source` source and
`batch.target` target samples.

Every sample is a pure function of (seed, t, rank, slot): the image order comes from a
seeded permutation per epoch, and augmentation from a generator seeded with the same key.
The loader's whole position is therefore the next iteration t, so saving and restoring it is
exact, with or without worker processes, and ranks of a multi-GPU run draw disjoint shards.
"""
import numpy as np
import torch

from .datasets import build_dataset
from .rcs import RareClassSampler, class_counts
from .transforms import train_transform

_SOURCE, _TARGET, _RCS = 0, 1, 2  # independent random streams


class PairedSteps(torch.utils.data.Dataset):
    """Map-style dataset indexed by the iteration t."""

    def __init__(self, cfg, stage, rank=0, world_size=1, progress=True):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.seed = cfg["seed"]
        self.crop_size = tuple(cfg["stages"][str(stage)]["crop_size"])
        self.num_steps = cfg["stages"][str(stage)]["iters"]
        self.source = build_dataset(cfg["source"], "train")
        self.target = build_dataset(cfg["target"], "train")
        rcs = cfg["rcs"]
        self.rcs = None
        if rcs["enabled"]:
            self.rcs = RareClassSampler(class_counts(self.source, progress), rcs["temperature"],
                                        rcs["min_pixels"], rcs["min_crop_ratio"])
        self._permutations = {}

    def __len__(self):
        return self.num_steps

    def _rng(self, stream, t, slot):
        return np.random.default_rng([self.seed, stream, t, self.rank, slot])

    def _epoch_order(self, stream, size, index):
        """Element `index` of an endless sequence of seeded per-epoch permutations of range(size)."""
        epoch, position = divmod(index, size)
        key = (stream, epoch)
        if key not in self._permutations:
            self._permutations = {key: np.random.default_rng([self.seed, stream, epoch]).permutation(size)}
        return int(self._permutations[key][position])

    def _global_slot(self, t, slot, batch):
        return (t * self.world_size + self.rank) * batch + slot

    def _transform(self, image, label, rng, side, cat_max_ratio):
        pipe = self.cfg["pipeline"]
        return train_transform(image, label, rng, self.cfg[side]["resize"], self.crop_size,
                               cat_max_ratio, pipe["flip_prob"], pipe["mean"], pipe["std"])

    def source_sample(self, t, slot):
        rng = self._rng(_SOURCE, t, slot)
        cat_max_ratio = self.cfg["pipeline"]["cat_max_ratio"]
        if self.rcs is None:
            slot_id = self._global_slot(t, slot, self.cfg["batch"]["source"])
            index = self._epoch_order(_SOURCE, len(self.source), slot_id)
            return self._transform(*self.source.load(index), rng, "source", cat_max_ratio)
        rare_class, index = self.rcs.draw(self._rng(_RCS, t, slot))
        image, label = self.source.load(index)
        for _ in range(10):  # re-crop until the crop holds enough of the drawn class
            out = self._transform(image, label, rng, "source", cat_max_ratio)
            if (out[1] == rare_class).sum() > self.rcs.min_crop_pixels:
                break
        return out

    def target_sample(self, t, slot):
        index = self._epoch_order(_TARGET, len(self.target), self._global_slot(t, slot, self.cfg["batch"]["target"]))
        image, _ = self._transform(self.target.load_image(index), None, self._rng(_TARGET, t, slot), "target", 1.0)
        return image

    def __getitem__(self, t):
        source = [self.source_sample(t, j) for j in range(self.cfg["batch"]["source"])]
        target = [self.target_sample(t, j) for j in range(self.cfg["batch"]["target"])]
        return {
            "t": t,
            "source_image": torch.stack([img for img, _ in source]),
            "source_label": torch.stack([lbl for _, lbl in source]),
            "target_image": torch.stack(target),
        }


def paired_loader(steps, start=0, workers=0, pin_memory=False):
    """Iterate the steps of `steps` (a PairedSteps) from `start`: resuming is `start`."""
    return torch.utils.data.DataLoader(
        steps, sampler=range(start, len(steps)), batch_size=None, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0,
    )
