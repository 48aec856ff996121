"""The inexact subproblem solver's proximal-gradient paths (plain and accelerated) and the nuclear prox.

Q(y) = 1/2 sum d (y - z)^2 + tau psi(y) with a random, badly conditioned diagonal d, in float64.
"""
import pytest
import torch

from structkit.layout import GroupLayout, group_dim_indices
from structkit.regularizers import get_regularizer
from structkit.solvers import RAMDA
from structkit.solvers.subproblem import solve_subproblem, subproblem_objective

F64 = torch.float64


def nuclear_problem(seed=0, spread=6.0):
    """Three matrices (wide, wide, tall), z ~ N(0, 1), log d uniform over ``spread`` (max d / min d ~ e^spread)."""
    g = torch.Generator().manual_seed(seed)
    layout = GroupLayout([torch.Size([12, 20]), torch.Size([12, 20]), torch.Size([15, 9])], ["tensor"] * 3, dtype=F64)
    z = torch.randn(layout.numel, generator=g, dtype=F64)
    d = torch.exp(torch.rand(layout.numel, generator=g, dtype=F64) * spread - spread / 2)
    return layout, z, d


def assert_nuclear_kkt(y, z, d, tau, layout, atol):
    """0 in d (y - z) + tau d||y||_*, per matrix: M = d (z - y) / tau must be U1 V1^T + W with U1^T W = 0,
    W V1 = 0 and ||W||_2 <= 1 (U1, V1: singular vectors of y's nonzero singular values)."""
    for ym, mm in zip(layout.matrices(y), layout.matrices(d * (z - y) / tau)):
        u, s, vh = torch.linalg.svd(ym, full_matrices=False)
        r = int((s > 1e-7).sum())
        assert 0 < r < min(ym.shape), "the test problem should have a nontrivial rank"
        u1, v1 = u[:, :r], vh[:r].T
        assert torch.allclose(u1.T @ mm @ v1, torch.eye(r, dtype=F64), atol=atol)
        w = mm - u1 @ v1.T
        assert torch.allclose(u1.T @ w, torch.zeros(r, w.shape[1], dtype=F64), atol=atol)
        assert torch.allclose(w @ v1, torch.zeros(w.shape[0], r, dtype=F64), atol=atol)
        assert torch.linalg.matrix_norm(w, ord=2) <= 1 + atol


def test_nuclear_prox_matches_svd_soft_threshold_wide_and_tall():
    g = torch.Generator().manual_seed(1)
    layout = GroupLayout([torch.Size([7, 11]), torch.Size([11, 7]), torch.Size([6, 2, 3]), torch.Size([5, 5])],
                         ["tensor"] * 4, dtype=F64)
    x = torch.randn(layout.numel, generator=g, dtype=F64)
    tau = torch.tensor([1.0, 1.5, 0.7, 0.0], dtype=F64)
    reg = get_regularizer("nuclear")
    y, value = reg.prox_with_value(x, tau, layout)
    assert torch.equal(y, reg.prox(x, tau, layout))
    for k, (xm, ym) in enumerate(zip(layout.matrices(x), layout.matrices(y))):
        u, s, vh = torch.linalg.svd(xm, full_matrices=False)
        assert torch.allclose(ym, (u * (s - tau[k]).clamp_min(0)) @ vh, atol=1e-12)
    assert torch.allclose(value, reg.value(y, layout), atol=1e-10)
    # tau 0 is the identity, including a rank-deficient input
    low = torch.randn(5, 2, generator=g, dtype=F64) @ torch.randn(2, 5, generator=g, dtype=F64)
    one = GroupLayout([torch.Size([5, 5])], ["tensor"], dtype=F64)
    assert torch.allclose(reg.prox(low.reshape(-1), 0.0, one), low.reshape(-1), atol=1e-12)


def test_accelerated_matches_high_accuracy_reference_and_satisfies_kkt():
    layout, z, d = nuclear_problem(spread=4.0)
    reg, tau = get_regularizer("nuclear"), 1.5
    zero = torch.zeros_like(z)
    ref, ref_info = solve_subproblem(reg, z, d, tau, layout, warm_start=zero, rtol=1e-11, max_iter=20000,
                                     method="pg")
    assert ref_info.iters < 20000
    y, info = solve_subproblem(reg, z, d, tau, layout, warm_start=zero, rtol=1e-11, max_iter=20000, method="apg")
    assert info.iters < 20000 and info.residual <= 1e-11 * torch.linalg.vector_norm(d * z)
    # fewer iterations at high accuracy too (322 vs 491): this needs the momentum restart, without which
    # FISTA takes 1602 iterations here
    assert 1.25 * info.iters <= ref_info.iters, (info.iters, ref_info.iters)
    assert torch.allclose(y, ref, atol=1e-9)
    assert_nuclear_kkt(y, z, d, tau, layout, atol=1e-8)
    q = subproblem_objective(reg, y, z, d, tau, layout)
    assert abs(q - subproblem_objective(reg, ref, z, d, tau, layout)) <= 1e-10 * abs(q)
    # "auto" is the accelerated solver for a convex regularizer without an exact diagonal solution
    y_auto, info_auto = solve_subproblem(reg, z, d, tau, layout, warm_start=zero, rtol=1e-11, max_iter=20000)
    assert info_auto.iters == info.iters and torch.equal(y_auto, y)


@pytest.mark.parametrize("rtol", [1e-2, 1e-3])
def test_accelerated_needs_far_fewer_iterations_on_a_badly_conditioned_problem(rtol):
    layout, z, d = nuclear_problem(seed=2, spread=7.0)  # max d / min d ~ 1000, like RAMDA's P
    reg, tau = get_regularizer("nuclear"), 1.0
    zero = torch.zeros_like(z)
    tol = rtol * torch.linalg.vector_norm(d * z)
    _, pg = solve_subproblem(reg, z, d, tau, layout, warm_start=zero, rtol=rtol, max_iter=100000, method="pg")
    _, apg = solve_subproblem(reg, z, d, tau, layout, warm_start=zero, rtol=rtol, max_iter=100000, method="apg")
    assert pg.residual <= tol and apg.residual <= tol  # both certified by the same stopping rule
    assert 3 * apg.iters <= pg.iters, (apg.iters, pg.iters)


def test_certificate_bounds_the_distance_to_the_solution():
    """Q is (min d)-strongly convex, so ||y - y*|| <= dist(0, dQ(y)) / min d: the reported certificate must
    be a genuine subgradient norm for this bound to hold at every tolerance."""
    layout, z, d = nuclear_problem(seed=3, spread=4.0)
    reg, tau = get_regularizer("nuclear"), 1.2
    zero = torch.zeros_like(z)
    ref, _ = solve_subproblem(reg, z, d, tau, layout, warm_start=zero, rtol=1e-11, max_iter=50000, method="apg")
    for rtol in (1e-1, 1e-2, 1e-3):
        for method in ("pg", "apg"):
            y, info = solve_subproblem(reg, z, d, tau, layout, warm_start=zero, rtol=rtol, max_iter=50000,
                                       method=method)
            if torch.equal(y, zero):
                continue
            assert torch.linalg.vector_norm(y - ref) <= info.residual / d.min() * (1 + 1e-6) + 1e-10, (rtol, method)


def test_accelerated_never_increases_q_over_the_warm_start():
    layout, z, d = nuclear_problem(seed=4, spread=6.0)
    reg, tau = get_regularizer("nuclear"), 1.0
    ref, _ = solve_subproblem(reg, z, d, tau, layout, warm_start=torch.zeros_like(z), rtol=1e-8, max_iter=50000)
    g = torch.Generator().manual_seed(5)
    warm = ref + 1e-3 * torch.randn(z.shape, generator=g, dtype=F64)  # close to the optimum: momentum overshoots
    q_warm = subproblem_objective(reg, warm, z, d, tau, layout)
    for max_iter in (1, 2, 3, 5, 8, 13):
        y, _ = solve_subproblem(reg, z, d, tau, layout, warm_start=warm, rtol=1e-14, max_iter=max_iter,
                                method="apg")
        assert subproblem_objective(reg, y, z, d, tau, layout) <= q_warm + 1e-12


@pytest.mark.parametrize("method", ["pg", "apg"])
def test_group_lasso_proximal_gradient_matches_the_exact_diagonal_solve(method):
    g = torch.Generator().manual_seed(6)
    shapes = [torch.Size([10, 6]), torch.Size([4, 3, 2])]
    layout = GroupLayout(shapes, group_dim_indices(shapes, 0), dtype=F64)
    z = torch.randn(layout.numel, generator=g, dtype=F64)
    d = torch.exp(torch.rand(layout.numel, generator=g, dtype=F64) * 4 - 2)
    reg, tau = get_regularizer("group_lasso"), 0.6
    exact, info = solve_subproblem(reg, z, d, tau, layout, warm_start=z, rtol=1e-12, method="exact")
    assert info.exact
    y, info = solve_subproblem(reg, z, d, tau, layout, warm_start=torch.zeros_like(z), rtol=1e-12, max_iter=20000,
                               method=method)
    assert not info.exact and info.iters < 20000
    assert torch.allclose(y, exact, atol=1e-9)
    assert (layout.norms(y) == 0).equal(layout.norms(exact) == 0)
    assert 0 < int((layout.norms(exact) == 0).sum()) < layout.num_groups


def test_method_errors():
    layout, z, d = nuclear_problem()
    with pytest.raises(ValueError, match="no exact"):
        solve_subproblem(get_regularizer("nuclear"), z, d, 1.0, layout, warm_start=z, rtol=1e-3, method="exact")
    with pytest.raises(ValueError, match="not convex"):
        solve_subproblem(get_regularizer("binary"), z, d, 1.0, layout, warm_start=z, rtol=1e-3, method="apg")
    with pytest.raises(ValueError, match="must be one of"):
        solve_subproblem(get_regularizer("nuclear"), z, d, 1.0, layout, warm_start=z, rtol=1e-3, method="fista")


def test_ramda_warm_starts_at_its_previous_subproblem_solution():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3)).double()
    x, t = torch.randn(32, 8, dtype=F64), torch.randint(0, 3, (32,))
    hidden = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    results = {}
    for method in ("pg", "apg"):
        model_m = __import__("copy").deepcopy(model)
        hidden_m = [model_m[0].weight, model_m[2].weight]
        rest_m = [p for p in model_m.parameters() if all(p is not h for h in hidden_m)]
        opt = RAMDA([{"params": hidden_m, "regularizer": "nuclear", "lam": 0.05}, {"params": rest_m}], lr=0.1,
                    momentum=0.5, inner_tol=1e-8, inner_max_iter=100000, subproblem=method)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model_m(x), t).backward()
            opt.step()
            state = opt.state[hidden_m[0]]
            assert state["W_hat"].shape == state["V"].shape  # kept for the next step's warm start
        results[method] = (torch.cat([p.detach().reshape(-1) for p in hidden_m]), state["W_hat"].clone())
        opt.restart(0.1)
        assert "W_hat" not in opt.state[hidden_m[0]]  # a new stage starts its first solve at the restart point
    assert len(rest) == len(rest_m)
    assert torch.allclose(results["pg"][0], results["apg"][0], atol=1e-7)
    assert torch.allclose(results["pg"][1], results["apg"][1], atol=1e-7)
