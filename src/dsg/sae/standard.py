"""The standard (ReLU) SAE: f = relu(pre)."""

import torch

from .base import ARCHITECTURES, SAE


@ARCHITECTURES.register("standard")
class StandardSAE(SAE):
    architecture = "standard"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)
