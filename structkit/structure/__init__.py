"""Declaring structure: rules -> groups (:func:`group_parameters`, :class:`GroupSet`) and the structure-kind
registry (``channels``, ``heads``, ``lowrank``, ``binary``, ``unstructured`` and your own)."""
from .kinds import Block, BuildContext, PruneContext, StructureKind, Target, get_kind, list_kinds, register_kind
from . import channels, heads, matrix  # noqa: F401  (register the built-in kinds)
from .groupset import GroupSet, group_parameters
from .matrix import numerical_rank
from .modules import BinaryConv2d, BinaryLinear, PrunedMultiheadAttention
from .rules import StructureRule, parse_rules

__all__ = ["Block", "BuildContext", "PruneContext", "StructureKind", "Target", "get_kind", "list_kinds",
           "register_kind", "GroupSet", "group_parameters", "numerical_rank", "BinaryConv2d", "BinaryLinear",
           "PrunedMultiheadAttention", "StructureRule", "parse_rules"]
