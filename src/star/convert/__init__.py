"""Weights trained by other code bases, as star model folders."""

from star.convert.arm import convert_arm

__all__ = ["convert_arm"]
