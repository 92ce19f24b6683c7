"""The JumpReLU SAE (Gemma Scope): f = relu(pre) · (pre > threshold), one learned threshold per latent."""

import torch

from ..errors import DSGError
from .base import ARCHITECTURES, SAE


@ARCHITECTURES.register("jumprelu")
class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    def _extra_tensors(self, threshold):
        if threshold is None:
            raise DSGError("A jumprelu SAE needs a 'threshold' tensor of shape [d_sae], and none was given.")
        return {"threshold": threshold}

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)
