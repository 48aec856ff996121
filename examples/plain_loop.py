"""structkit inside a plain PyTorch training loop: declare channel structure, train with RAMDA, remove the
exactly-zero channels, check that the slim network computes the same function.

    python examples/plain_loop.py          # a few seconds on 2 CPU cores; scikit-learn's digits, no download

The only structkit-specific lines are marked ``# structkit``.
"""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import structkit
from structkit.solvers import RAMDA, StageScheduler


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10))


def main(epochs: int = 8, lam: float = 2e-3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    train = torch.utils.data.TensorDataset(X[:1400], y[:1400])
    train_loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    model = make_model()

    # structkit: every conv's output channels (with its BatchNorm) is a group with group-lasso weight lam
    groups = structkit.group_parameters(model, X[:8], [{"select": "*", "types": ["Conv2d"], "kind": "channels",
                                                        "lam": lam}])
    opt = RAMDA(groups.param_groups(), lr=1e-2, momentum=0.1)
    # structkit: the last stage restarts and ramps the momentum to 1 by its middle -> exactly-zero groups
    sched = StageScheduler(opt, milestones=[epochs - 2], epochs=epochs, steps_per_epoch=len(train_loader))

    for _ in range(epochs):
        model.train()
        for xb, yb in train_loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()

    model.eval()
    zero = groups.metrics()  # structkit: which groups are exactly zero
    slim, report = structkit.prune(model, groups, X[1400:1528])  # structkit: remove them, verified
    with torch.no_grad():
        acc = (slim(X[1400:]).argmax(1) == y[1400:]).float().mean().item()
    print(f"exactly-zero groups: {zero['zero_groups']} of {zero['num_groups']}; test accuracy {acc:.3f}")
    print(report.summary())
    return {"accuracy": acc, "zero_groups": zero["zero_groups"], "params_before": report.params_before,
            "params_after": report.params_after, "verify_rel_diff": report.verify_rel_diff}


if __name__ == "__main__":
    main()
