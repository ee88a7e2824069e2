"""data.source=synthetic: random images held on the device, for measuring the model without the data
path. Same interface as the real loaders; data.synthetic_size images per epoch across all ranks."""
from __future__ import annotations

import torch

from .plan import ResumableTrainLoader, Stream, TrainPlan, ValPlan, seed_of
from .transforms import Normalize, Preprocess


def _random_batch(batch_size: int, size: int, num_classes: int, pre: Preprocess,
                  device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), generator=gen, dtype=torch.uint8)
    targets = torch.randint(0, num_classes, (batch_size,), generator=gen)
    return Normalize(pre, device)(pixels.to(device)), targets.to(device)


class SyntheticTrainLoader(ResumableTrainLoader):
    backend = "synthetic"

    def __init__(self, plan: TrainPlan, num_classes: int, pre: Preprocess, device: torch.device):
        super().__init__(plan, [str(i) for i in range(num_classes)], [])
        self._batch = _random_batch(plan.batch_size, pre.img_size, num_classes, pre, device,
                                    seed_of(Stream.SYNTHETIC, plan.seed, plan.rank, 0))

    def _batches(self, epoch: int, start_step: int):
        for _ in range(start_step, len(self)):
            yield self._batch


class SyntheticValLoader:
    def __init__(self, plan: ValPlan, num_classes: int, pre: Preprocess, device: torch.device):
        self.plan, self.num_images, self.skipped = plan, plan.num_samples, []
        self.classes = [str(i) for i in range(num_classes)]
        self._images, targets = _random_batch(plan.batch_size, pre.val_img_size, num_classes, pre,
                                              device, seed_of(Stream.SYNTHETIC, 0, plan.rank, 1))
        _, pad = plan.rank_indices()
        pad = torch.as_tensor(pad, device=device)
        self._targets = [torch.where(pad[k:k + plan.batch_size], -1, targets[:len(pad[k:k + plan.batch_size])])
                         for k in range(0, plan.per_rank, plan.batch_size)]

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self):
        for targets in self._targets:
            yield self._images[:len(targets)], targets
