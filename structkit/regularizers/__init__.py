"""Regularizer registry: ``none``, ``l1``, ``group_lasso``, ``nuclear``, ``binary`` and your own.

>>> from structkit.regularizers import get_regularizer, list_regularizers, register_regularizer
"""
from .base import Regularizer, get_regularizer, list_regularizers, register_regularizer
from . import none, l1, group_lasso, nuclear, binary  # noqa: F401  (registers the built-ins)
from .l1 import soft_threshold

__all__ = ["Regularizer", "get_regularizer", "list_regularizers", "register_regularizer", "soft_threshold"]
