"""What every fastattn drop-in module shares: it subclasses a torch.nn class and adds no state."""

from __future__ import annotations

import torch


class DropIn:
    """Mixin (first base) of a fastattn module that subclasses a torch.nn class and adds no state, so that an
    instance of the torch.nn class can become one without a copy (:func:`fastattn.convert` changes the class in
    place; :meth:`from_torch` makes a second module)."""

    @classmethod
    def from_torch(cls, module: torch.nn.Module):
        """A module of this class sharing ``module``'s parameters and buffers (no copy); ``module`` is unchanged."""
        new = cls.__new__(cls)
        new.__dict__ = module.__dict__.copy()
        return new
