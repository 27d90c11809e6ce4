"""Data sets: the synthetic phantom with exact ground truth."""

from .phantom import Phantom, PhantomSpec, phantom

__all__ = ["Phantom", "PhantomSpec", "phantom"]
