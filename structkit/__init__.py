"""structkit: train networks with a declared structure, prune the exact zeros, verify, deploy."""
__version__ = "0.1.0"
from .structure import group_parameters, GroupSet
from .prune import prune, verify, PruneReport
from .slim import save_slim, load_slim
