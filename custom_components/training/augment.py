"""Device side of the training data: augmentation on the GPU, as the trainer's ``prepare_batch``.

``DeviceAugmentBatch`` moves a host batch (uint8 image/label/tube, float16 distance map, each
``patch + 2 * margin`` large) to the device, runs ``transform`` (a MONAI ``Compose`` from train.json:
one fused ``Rand3DElasticd`` resample with rotation and scaling that crops back to the patch, flips,
intensity augmentation, then ``ConcatItemsd`` of the targets into ``label``) on every sample there, and
returns ``(image, label)`` as the ``SupervisedTrainer`` expects. On a machine without CUDA the same
transforms run on the CPU, so the tests and the demo exercise the very same path.

It runs in the trainer's own thread, so its random stream is sequential and reproducible;
``set_random_state`` (called per epoch by ``EpochSeedHandler``) makes resuming exact. The seconds it
took are kept in ``last_seconds`` for the throughput handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from monai.transforms import Randomizable

__all__ = ["DeviceAugmentBatch"]


class DeviceAugmentBatch:
    """``prepare_batch`` that augments on ``device``.

    Args:
        transform: dict transform applied per sample on the device (``None``: only concatenation).
        image_key: input key. label_key: key of the concatenated target after ``transform``.
        keys: keys moved to the device, converted to float32 (image scaled by ``image_scale``).
        image_scale: multiplies the uint8 image (1/255 maps it to [0, 1]).
    """

    def __init__(
        self,
        transform: Callable | None = None,
        image_key: str = "image",
        label_key: str = "label",
        keys: Sequence[str] = ("image", "label", "sdm", "tube"),
        image_scale: float = 1 / 255,
    ):
        self.transform = transform
        self.image_key = image_key
        self.label_key = label_key
        self.keys = list(keys)
        self.image_scale = float(image_scale)
        self.last_seconds = 0.0

    def set_random_state(self, seed: int) -> None:
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(seed) % (2**32))

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        start = time.perf_counter()
        device = torch.device(device) if device is not None else torch.device("cpu")
        moved = {}
        for key in self.keys:
            if key not in batchdata:
                raise ValueError(f"batch has no key '{key}' (keys: {sorted(batchdata)}).")
            t = torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking).float()
            moved[key] = t * self.image_scale if key == self.image_key else t
        batch_size = moved[self.image_key].shape[0]
        images, labels = [], []
        for b in range(batch_size):
            sample = {k: v[b] for k, v in moved.items()}
            if self.transform is not None:
                sample = self.transform(sample)
            images.append(torch.as_tensor(sample[self.image_key]))
            labels.append(torch.as_tensor(sample[self.label_key]))
        image, label = torch.stack(images), torch.stack(labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.last_seconds = time.perf_counter() - start
        return image, label
