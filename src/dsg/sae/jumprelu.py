"""The JumpReLU SAE (Gemma Scope): f = relu(pre) · (pre > threshold), one learned threshold per latent."""

import torch

from .base import ARCHITECTURES, SAE


@ARCHITECTURES.register("jumprelu")
class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    extra_tensors = ("threshold",)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)
