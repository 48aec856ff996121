"""structkit: train networks with a declared structure, prune the exact zeros, verify, deploy."""
__version__ = "0.1.0"
