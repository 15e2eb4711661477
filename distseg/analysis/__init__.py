"""Domain-gap analysis: rank candidate intermediate datasets by how close they are to a target.

``sources`` draws seeded tile samples from shard folders; ``encoder`` is the fixed multi-depth feature extractor;
``stats`` accumulates per-dataset statistics in one streaming pass; ``measures`` and ``logme`` turn them into
distances and transferability; ``labels`` compares class maps by name; ``ranking`` combines the signals;
``report`` and ``embedding`` write the table and the picture; ``gap`` runs the whole analysis.
"""
from __future__ import annotations


class GapError(ValueError):
    """A domain-gap request that cannot run (bad option, encoder and tiles that do not fit); one error line."""
