"""Slow reference implementations used by the tests."""

from .loop import dense_reference, moe_reference

__all__ = ["dense_reference", "moe_reference"]
