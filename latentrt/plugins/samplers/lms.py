"""Placeholder: samplers of this module are being written."""

from __future__ import annotations

from latentrt.core.registry import Registry


def register(registry: Registry) -> None:
    """Register this module's samplers."""
