"""Test support: tiny prepared volumes (a bright cube labelled 1) for training a job in seconds."""

import torch
from monai.data import MetaTensor


def cube_volume(seed: int) -> dict:
    """A 16^3 volume dict as the executor prepares it: image (1,16,16,16) float, label (1,16,16,16)."""
    g = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.randn(1, 16, 16, 16, generator=g)
    image[:, 4:10, 4:10, 4:10] += 1.0
    label = torch.zeros(1, 16, 16, 16)
    label[:, 4:10, 4:10, 4:10] = 1.0
    return {"image": MetaTensor(image), "label": MetaTensor(label)}
