"""One side of an A/B comparison: the dense (a) or the pruned (b) deployment."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Arm:
    name: str  # "a" or "b"
    url: str = ""  # base URL of its OpenAI-compatible server
    model: str = ""  # the model id it serves
