"""The TopK SAE (Gao et al. 2024; sparsify): f = relu(pre) kept only at each token's k largest entries.

A latent's activation depends on every other latent's pre-activation, so a TopK SAE cannot be cut to a subset
of its latents; in return its codes are k (value, index) pairs per token, which statistics use without ever
building a dense [tokens, d_sae] tensor.
"""

import torch

from ..errors import DSGError
from .base import ARCHITECTURES, SAE


@ARCHITECTURES.register("topk")
class TopKSAE(SAE):
    architecture = "topk"
    encodes_latents_independently = False

    def _check_k(self, k, d_sae):
        if not (isinstance(k, int) and 0 < k <= d_sae):
            raise DSGError(f"A topk SAE needs an integer k in [1, {d_sae}], got {k!r}.")
        return k

    def _top(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = pre.topk(self.k, dim=-1)
        return torch.relu(top.values), top.indices

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = self._top(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k activations and their latent ids, ([..., k], [..., k]), without the dense f."""
        return self._top(self.encode_pre(x))

    def config_extra(self) -> dict:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}
