"""Reference row ``random_init``: the backbone as initialised, never trained.

The engine seeds and builds the backbone exactly as for a method run, so seed s gives the same
initial weights every method starts from; ``embed`` is the pooled features of that untrained
backbone (in eval mode, i.e. BatchNorm with its initial running statistics). What a method gains
over this row is what its training added.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods import register_method
from methods.base import ReferenceMethod


@dataclass
class RandomInitConfig:
    preset: str = "default"


@register_method("random_init")
class RandomInit(ReferenceMethod):
    Config = RandomInitConfig
