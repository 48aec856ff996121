"""GroupLayout's reductions against a brute-force reference: an explicit group id for every entry."""
import pytest
import torch

from structkit.layout import GroupLayout


def brute_force_ids(shapes, indices):
    """The group id of every flat entry, written out entry by entry (the definition in structkit/layout.py)."""
    ids, next_free = [], 0
    for shape, ix in zip(shapes, indices):
        numel = torch.Size(shape).numel()
        if ix == "tensor":
            part = [next_free] * numel
        else:
            dim, offset = ix["dim"], ix.get("offset", next_free)
            block, period = ix.get("block", 1), ix.get("period", 0)
            coords = torch.arange(numel).reshape(shape)
            part = [0] * numel
            for i in range(shape[dim]):
                g = offset + ((i % period) if period else i) // block
                for flat in coords.select(dim, i).reshape(-1).tolist():
                    part[flat] = g
        ids.extend(part)
        next_free = max([next_free, *[p + 1 for p in part]])
    return torch.tensor(ids)


CASES = {
    "rows": ([(4, 3, 2, 2), (5, 7)], [{"dim": 0, "offset": 0}, {"dim": 0, "offset": 4}]),
    "columns": ([(4, 3, 2, 2), (6, 3)], [{"dim": 1, "offset": 0}, {"dim": 1, "offset": 3}]),
    "shared conv + bn": ([(6, 2, 3, 3), (6,), (6,)], [{"dim": 0, "offset": 0}] * 3),
    "heads (block + period)": ([(12, 4), (12,), (4, 4)],
                               [{"dim": 0, "offset": 0, "block": 2, "period": 4}, {"dim": 0, "offset": 0, "block": 2, "period": 4},
                                {"dim": 1, "offset": 0, "block": 2}]),
    "tensor": ([(3, 5), (2, 2, 2)], ["tensor", "tensor"]),
    "out of order offsets": ([(3, 2), (2, 2)], [{"dim": 0, "offset": 2}, {"dim": 0, "offset": 0}]),
}


@pytest.mark.parametrize("case", CASES)
def test_reductions_match_brute_force(case):
    shapes, indices = CASES[case]
    layout = GroupLayout([torch.Size(s) for s in shapes], indices, dtype=torch.float64)
    ids = brute_force_ids(shapes, indices)
    G = int(ids.max()) + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layout.numel, generator=g, dtype=torch.float64)
    v = torch.randn(G, generator=g, dtype=torch.float64)
    ref_sum = torch.zeros(G, dtype=torch.float64).index_add_(0, ids, x)
    ref_sq = torch.zeros(G, dtype=torch.float64).index_add_(0, ids, x * x)
    ref_max = torch.full((G,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, ids, x, "amax")
    assert layout.num_groups == G
    assert torch.equal(layout.sizes, torch.bincount(ids, minlength=G).double())
    assert torch.allclose(layout.sum(x), ref_sum, atol=1e-12)
    assert torch.allclose(layout.sumsq(x), ref_sq, atol=1e-12)
    assert torch.allclose(layout.norms(x), ref_sq.sqrt(), atol=1e-12)
    assert torch.equal(layout.max(x), ref_max)
    assert torch.equal(layout.expand(v), v[ids])
    assert torch.equal(layout.ids, ids)
    assert torch.allclose(layout.mul_(x.clone(), v), x * v[ids], atol=0)
    out = torch.empty_like(x)
    assert torch.equal(layout.add(x, v, out=out), x + v[ids])


def test_elementwise_layout_is_the_identity():
    layout = GroupLayout([torch.Size([3, 4])], ["element"])
    x = torch.randn(12)
    assert layout.ids is None and layout.num_groups == 12
    assert torch.equal(layout.sum(x), x) and torch.equal(layout.norms(x), x.abs())
    assert torch.equal(layout.expand(x), x) and layout.expand(x) is not x
