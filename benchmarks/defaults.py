"""The hyperparameters every benchmark gives each optimizer: the structured solvers at their documented defaults
(docs/solvers.md), AdamW at the rates docs/benchmarks.md reports. One table, so the sections compare like with
like."""
SOLVERS = {
    "ramda": {"lr": 1e-2, "momentum": 0.1},
    "rmda": {"lr": 0.1, "momentum": 0.1},
    "proxgen": {"lr": 1e-3},
    "proxsgd": {"lr": 0.1, "momentum": 0.1},
}
ADAMW = {"lr": 2e-3}
MSGD = {"lr": 0.1, "momentum": 0.9}  # dense momentum SGD, the low-rank section's reference
