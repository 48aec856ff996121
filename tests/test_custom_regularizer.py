"""The custom-regularizer example of docs/custom_regularizer.md works, verbatim, with every solver."""
import pathlib
import re

import pytest
import torch
from torch import nn

from structkit.layout import GroupLayout
from structkit.regularizers import get_regularizer
from structkit.solvers import RAMDA, RMDA, ProxGen, ProxSGD

DOC = pathlib.Path(__file__).parents[1] / "docs" / "custom_regularizer.md"


@pytest.fixture(scope="module")
def elastic_net():
    first_block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    code_lines = [line for line in first_block.splitlines() if line.strip()]
    assert len(code_lines) <= 20, "the doc promises a regularizer in <= 20 lines"
    exec(first_block, {})
    return get_regularizer("elastic_net")


def test_doc_example_prox_satisfies_optimality(elastic_net):
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    layout = GroupLayout([x.shape], ["element"], dtype=torch.float64)
    tau, beta = 0.3, elastic_net.beta
    y = elastic_net.prox(x, tau, layout)
    nz = y != 0
    # 0 in y - x + tau (sign(y) + beta y)  for y != 0;  |x| <= tau  for y == 0
    assert torch.allclose(y[nz] - x[nz] + tau * (y[nz].sign() + beta * y[nz]), torch.zeros(int(nz.sum()), dtype=torch.float64))
    assert (x[~nz].abs() <= tau + 1e-12).all() and 0 < int(nz.sum()) < 1000


@pytest.mark.parametrize("cls", [RAMDA, RMDA, ProxSGD, ProxGen])
def test_doc_example_trains_with_every_solver(elastic_net, cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    opt = cls([{"params": model.parameters(), "regularizer": "elastic_net", "lam": 1e-3}], lr=1e-2)
    loss0 = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < loss0
