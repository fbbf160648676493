"""Reference row ``pixels``: the evaluation protocol applied to the images themselves.

``embed`` returns each image as the evaluation pipeline hands it over (resized, centre-cropped and
standardised per channel with the dataset's mean and std), flattened to one vector of C·H·W
values. k-NN and the linear probe then measure what raw standardised pixels already give, the
floor a learned representation has to beat. Nothing is trained; the backbone the engine builds is
kept (it fixes the feature-cache key) but never used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register_method
from methods.base import ReferenceMethod


@dataclass
class PixelsConfig:
    preset: str = "default"


@register_method("pixels")
class Pixels(ReferenceMethod):
    Config = PixelsConfig
    # The features are the images and the evaluation draws nothing from the run's seed, so runs
    # of every seed give the same numbers (the default grid's three digits runs do).
    seed_invariant = True

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The eval-transformed images (B, C, H, W) flattened to (B, C·H·W)."""
        return images.reshape(images.shape[0], -1)
