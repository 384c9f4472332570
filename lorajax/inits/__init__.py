"""Initialisers that need the weights' data and change the base: they return ``(adapters, new_params)``."""

from lorajax.inits.olora import olora
from lorajax.inits.pissa import pissa

__all__ = ["pissa", "olora"]
