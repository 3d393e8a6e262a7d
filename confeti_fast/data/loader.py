"""The paired source/target loader: each iteration t gets `batch.source` source and
`batch.target` target samples.

Every sample is a pure function of (seed, t, rank, slot): the image order comes from a
seeded permutation per epoch, and augmentation from a generator seeded with the same key.
The loader's whole position is therefore the next iteration t, so saving and restoring it is
exact, with or without worker processes, and ranks of a multi-GPU run draw disjoint shards.

Both training sets (and `also_check`) are checked at start-up (data/check) under `data.bad_samples`. A sample
that fails to decode later raises BadSampleError ("error"), or ("skip") is replaced by the
next index that decodes, (i + 1) mod n, ...: a choice that depends only on the index and the
files, so resume stays exact. Each replacement is printed and listed in the batch's
"replaced" entry ({"path", "reason", "replacement"} dicts) for the trainer to log.
"""
import numpy as np
import torch

from ..errors import ConfetiError
from .check import BadSampleError, bad_samples_policy, check_datasets
from .datasets import build_dataset
from .rcs import RareClassSampler, class_counts
from .transforms import train_transform

_SOURCE, _TARGET, _RCS = 0, 1, 2  # independent random streams


class PairedSteps(torch.utils.data.Dataset):
    """Map-style dataset indexed by the iteration t."""

    def __init__(self, cfg, stage, rank=0, world_size=1, progress=True, bad_samples_file=None, also_check=()):
        """`bad_samples_file`: where the start-up check lists bad pairs (the trainer's
        work_dir/stage<N>/bad_samples.txt; None: beside each dataset). `also_check`: other
        datasets built with check=False (the val set), checked in the same pass."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.seed = cfg["seed"]
        self.crop_size = tuple(cfg["stages"][str(stage)]["crop_size"])
        self.num_steps = cfg["stages"][str(stage)]["iters"]
        self.bad_samples = bad_samples_policy(cfg)
        self.source = build_dataset(cfg["source"], "train", check=False, bad_samples=self.bad_samples)
        self.target = build_dataset(cfg["target"], "train", check=False, bad_samples=self.bad_samples)
        # All sets in one check, so one error lists the bad pairs of all.
        check_datasets([self.source, self.target, *also_check], self.bad_samples, bad_samples_file,
                       progress=progress, quiet=rank != 0)
        rcs = cfg["rcs"]
        self.rcs = None
        # Stage 0 trains CUT alone, which need not see the segmentor's rare-class bias.
        plain_cut_crops = stage == 0 and cfg["cut"].get("stage0_source_crops", "rcs") == "plain"
        if rcs["enabled"] and not plain_cut_crops:
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

    def _read(self, dataset, index, replaced, with_label=True):
        """Sample `index` of `dataset` (image and label, or the image alone). Under
        data.bad_samples=skip a sample that does not decode is replaced by the next one that
        does; each replacement is printed and appended to `replaced`."""
        failed = []
        for k in range(len(dataset)):
            j = (index + k) % len(dataset)
            try:
                sample = dataset.load(j) if with_label else dataset.load_image(j)
            except BadSampleError as err:
                if self.bad_samples != "skip":
                    raise
                failed.append(err)
                continue
            for err in failed:
                entry = {"path": err.path, "reason": err.reason, "replacement": dataset.samples[j][0]}
                print(f"data: cannot read {err.path} ({err.reason}); drew {entry['replacement']} instead "
                      f"(data.bad_samples=skip)", flush=True)
                if replaced is not None:
                    replaced.append(entry)
            return sample
        raise ConfetiError(f"no sample of the {dataset.kind} data at {dataset.root} can be read any more "
                           f"(first {failed[0].path}: {failed[0].reason})")

    def source_sample(self, t, slot, replaced=None):
        rng = self._rng(_SOURCE, t, slot)
        cat_max_ratio = self.cfg["pipeline"]["cat_max_ratio"]
        if self.rcs is None:
            slot_id = self._global_slot(t, slot, self.cfg["batch"]["source"])
            index = self._epoch_order(_SOURCE, len(self.source), slot_id)
            return self._transform(*self._read(self.source, index, replaced), rng, "source", cat_max_ratio)
        rare_class, index = self.rcs.draw(self._rng(_RCS, t, slot))
        image, label = self._read(self.source, index, replaced)
        for _ in range(10):  # re-crop until the crop holds enough of the drawn class
            out = self._transform(image, label, rng, "source", cat_max_ratio)
            if (out[1] == rare_class).sum() > self.rcs.min_crop_pixels:
                break
        return out

    def target_sample(self, t, slot, replaced=None):
        index = self._epoch_order(_TARGET, len(self.target), self._global_slot(t, slot, self.cfg["batch"]["target"]))
        image = self._read(self.target, index, replaced, with_label=False)
        image, _ = self._transform(image, None, self._rng(_TARGET, t, slot), "target", 1.0)
        return image

    def __getitem__(self, t):
        replaced = []  # per batch, so it travels back from worker processes with the batch
        source = [self.source_sample(t, j, replaced) for j in range(self.cfg["batch"]["source"])]
        target = [self.target_sample(t, j, replaced) for j in range(self.cfg["batch"]["target"])]
        return {
            "t": t,
            "source_image": torch.stack([img for img, _ in source]),
            "source_label": torch.stack([lbl for _, lbl in source]),
            "target_image": torch.stack(target),
            "replaced": replaced,
        }


def paired_loader(steps, start=0, workers=0, pin_memory=False):
    """Iterate the steps of `steps` (a PairedSteps) from `start`: resuming is `start`."""
    return torch.utils.data.DataLoader(
        steps, sampler=range(start, len(steps)), batch_size=None, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0,
    )
