"""Each proximal operator satisfies its optimality conditions (float64), scalar and diagonal metric."""
import pytest
import torch

from structkit.layout import GroupLayout, group_dim_indices
from structkit.regularizers import Regularizer, get_regularizer, list_regularizers, register_regularizer
from structkit.solvers.subproblem import solve_subproblem, subproblem_objective

TOL = 1e-9


@pytest.fixture(autouse=True)
def float64_default():
    """Optimality conditions are checked in float64; restore the default for other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rows_layout(shapes, dim=0):
    return GroupLayout(shapes, group_dim_indices(shapes, dim), dtype=torch.float64)


def test_registry_lists_builtins_and_suggests_names():
    assert {"none", "l1", "group_lasso", "nuclear", "binary"} <= set(list_regularizers())
    assert list_regularizers("group*") == ["group_lasso"]
    with pytest.raises(ValueError, match="Did you mean 'group_lasso'"):
        get_regularizer("grup_lasso")


def test_l1_prox_scalar_and_diagonal_kkt():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(500, generator=g), torch.rand(500, generator=g) + 0.1
    layout = GroupLayout([x.shape], ["element"], dtype=torch.float64)
    reg, tau = get_regularizer("l1"), 0.4
    for y, metric in ((reg.prox(x, tau, layout), torch.ones_like(d)), (reg.prox_diag(x, d, tau, layout), d)):
        nz = y != 0
        assert torch.allclose(metric[nz] * (y[nz] - x[nz]) + tau * y[nz].sign(), torch.zeros(int(nz.sum())), atol=TOL)
        assert ((metric[~nz] * x[~nz]).abs() <= tau + TOL).all()
        assert 0 < nz.sum() < 500  # both cases exercised


def group_lasso_kkt(y, z, d, tau, layout):
    """max violation of d (y - z) + tau w_g y_g/||y_g|| = 0 (y_g != 0) and ||d_g z_g|| <= tau w_g (y_g = 0)."""
    norms = layout.norms(y)
    zero = norms == 0
    T = tau * layout.weights
    grad = d * (y - z) + layout.expand(T / norms.clamp_min(1e-300)) * y
    grad = grad * layout.expand((~zero).double())
    screened_ok = (layout.norms(d * z) <= T + TOL) | ~zero
    return grad.abs().max().item(), bool(screened_ok.all()), int(zero.sum())


@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_prox_scalar_and_exact_diagonal_kkt(dim):
    g = torch.Generator().manual_seed(1)
    shapes = [torch.Size([16, 9]), torch.Size([16, 3, 3])]
    layout = rows_layout(shapes, dim)
    n = layout.numel
    z, d = torch.randn(n, generator=g), torch.rand(n, generator=g) * 5 + 0.05
    reg, tau = get_regularizer("group_lasso"), 0.9
    viol, ok, zeros = group_lasso_kkt(reg.prox(z, tau, layout), z, torch.ones(n), tau, layout)
    assert viol < 1e-9 and ok and 0 < zeros < layout.num_groups
    tau = 2.5
    viol, ok, zeros = group_lasso_kkt(reg.prox_diag(z, d, tau, layout), z, d, tau, layout)
    assert viol < 1e-8 and ok and 0 < zeros < layout.num_groups


def test_group_lasso_pg_matches_exact_solve():
    g = torch.Generator().manual_seed(2)
    layout = rows_layout([torch.Size([40, 25])])
    z, d = torch.randn(1000, generator=g), torch.rand(1000, generator=g) * 3 + 0.2
    reg, tau = get_regularizer("group_lasso"), 1.5
    exact = reg.prox_diag(z, d, tau, layout)
    pg, info = solve_subproblem(reg, z, d, tau, layout, warm_start=torch.zeros_like(z), rtol=1e-12,
                                max_iter=20000, method="pg")
    assert not info.exact and info.iters > 1
    assert torch.linalg.vector_norm(pg - exact) <= 1e-6 * torch.linalg.vector_norm(exact)
    assert (layout.norms(pg) == 0).equal(layout.norms(exact) == 0)  # same groups exactly zero
    assert info.screened > 0
    assert 0 < int((layout.norms(exact) == 0).sum()) < layout.num_groups


def test_nuclear_prox_satisfies_subgradient_condition():
    g = torch.Generator().manual_seed(3)
    shapes = [torch.Size([8, 6]), torch.Size([8, 2, 3]), torch.Size([5, 7])]
    layout = GroupLayout(shapes, ["tensor"] * 3, dtype=torch.float64)
    x = torch.randn(layout.numel, generator=g)
    tau = torch.tensor([2.0, 2.5, 2.0])  # per matrix
    y = get_regularizer("nuclear").prox(x, tau, layout)
    for k, (xm, ym) in enumerate(zip(layout.matrices(x), layout.matrices(y))):
        # x - y in tau * d||y||_*:  M = (x - y)/tau = U1 V1^T + W, U1^T W = 0, W V1 = 0, ||W||_2 <= 1
        m = (xm - ym) / tau[k]
        u, s, vh = torch.linalg.svd(ym, full_matrices=False)
        r = int((s > 1e-10).sum())
        assert 0 < r < min(ym.shape)  # some singular values removed, some kept
        u1, v1 = u[:, :r], vh[:r].T
        assert torch.allclose(u1.T @ m @ v1, torch.eye(r), atol=1e-9)
        w = m - u1 @ v1.T
        assert torch.allclose(u1.T @ w, torch.zeros(r, w.shape[1]), atol=1e-9)
        assert torch.linalg.matrix_norm(w, ord=2) <= 1 + 1e-9


def test_nuclear_pg_under_diagonal_metric_is_a_fixed_point_and_beats_perturbations():
    g = torch.Generator().manual_seed(4)
    layout = GroupLayout([torch.Size([6, 5])], ["tensor"], dtype=torch.float64)
    z, d = torch.randn(30, generator=g), torch.rand(30, generator=g) + 0.5
    reg, tau = get_regularizer("nuclear"), 0.8
    y, info = solve_subproblem(reg, z, d, tau, layout, warm_start=z.clone(), rtol=1e-11, max_iter=20000)
    assert not info.exact and info.residual <= 1e-11 * torch.linalg.vector_norm(d * z)
    q = subproblem_objective(reg, y, z, d, tau, layout)
    for _ in range(50):
        assert subproblem_objective(reg, y + 1e-4 * torch.randn(30, generator=g), z, d, tau, layout) >= q - 1e-12


def test_binary_prox_moves_entries_toward_their_row_targets():
    layout = rows_layout([torch.Size([2, 4])])
    x = torch.tensor([1.0, -3.0, 0.5, 2.5, 0.2, -0.2, 0.1, -0.1])
    y = get_regularizer("binary").prox(x, 0.3, layout)
    a = torch.tensor([1.75, 0.15])  # mean |x| per row
    target = torch.where(x >= 0, 1.0, -1.0) * a.repeat_interleave(4)
    expected = target + (x - target).sign() * ((x - target).abs() - 0.3).clamp_min(0)
    assert torch.allclose(y, expected)
    assert torch.allclose(y[4:], target[4:])  # within tau: reaches the binary value exactly


def test_custom_regularizer_needs_only_value_and_prox():
    @register_regularizer("test_scaled_l1")
    class ScaledL1(Regularizer):
        def value(self, x, layout):
            return 2 * x.abs().sum()

        def prox(self, x, tau, layout):
            return x.sign() * (x.abs() - 2 * layout.expand(tau)).clamp_min(0)

    reg = get_regularizer("test_scaled_l1")
    layout = GroupLayout([torch.Size([100])], ["element"], dtype=torch.float64)
    z, d = torch.randn(100), torch.rand(100) + 0.5
    y, info = solve_subproblem(reg, z, d, 0.2, layout, warm_start=torch.zeros(100), rtol=1e-12, max_iter=5000)
    assert torch.allclose(y, get_regularizer("l1").prox_diag(z, d, 0.4, layout), atol=1e-9)


@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_newton_certificate_is_the_min_norm_subgradient_and_bounds_the_error(dim):
    """solve_diag's residual == || grad Q(y) || over the nonzero groups (0 is a subgradient on the zero ones),
    the distance to the exact solution is <= residual / min d (strong convexity), and a warm start from the
    previous solve of a nearby problem meets a loose tolerance with no Newton step."""
    g = torch.Generator().manual_seed(3)
    shapes = [torch.Size([16, 9]), torch.Size([16, 3, 3])]
    layout = rows_layout(shapes, dim)
    z = torch.randn(layout.numel, generator=g)
    d = torch.rand(layout.numel, generator=g).pow(3) * 50 + 0.01
    reg, tau = get_regularizer("group_lasso"), 0.3
    exact = reg.prox_diag(z, d, tau, layout)
    T = tau * layout.weights
    for max_iter in (0, 1, 2):
        reg.newton_max_iter = max_iter
        sol = reg.solve_diag(z, d, tau, layout, rtol=0.0)
        norms = layout.norms(sol.y)
        grad = d * (sol.y - z) + layout.expand(T / norms.clamp_min(1e-300)) * sol.y
        grad = grad * layout.expand((norms > 0).double())
        assert torch.allclose(sol.residual, torch.linalg.vector_norm(grad), rtol=1e-8, atol=1e-12)
        assert torch.linalg.vector_norm(sol.y - exact) <= sol.residual / d.min() * (1 + 1e-9) + 1e-12
        assert torch.equal(norms == 0, layout.norms(exact) == 0)  # screening is exact whatever the iterations
    del reg.newton_max_iter
    warm = reg.solve_diag(z, d, tau, layout, rtol=0.0).warm
    z2 = z + 1e-3 * torch.randn(layout.numel, generator=g)
    d2 = d * (1 + 1e-3 * torch.rand(layout.numel, generator=g))
    cold = reg.solve_diag(z2, d2, tau, layout, rtol=1e-4)
    hot = reg.solve_diag(z2, d2, tau, layout, rtol=1e-4, warm=warm)
    assert hot.iters == 0 < cold.iters
    assert hot.residual <= 1e-4 * torch.linalg.vector_norm(d2 * z2)


def test_group_lasso_accelerator_path_runs_fixed_newton_steps_without_host_checks():
    """check=False (what accelerators use): a fixed number of Newton steps, more from a cold start; the
    certificate is still returned, and from a warm start one step meets the tolerance a CPU solve would."""
    g = torch.Generator().manual_seed(4)
    layout = rows_layout([torch.Size([64, 50])])
    z = torch.randn(layout.numel, generator=g)
    d = torch.rand(layout.numel, generator=g).pow(3) * 10 + 0.01
    reg = get_regularizer("group_lasso")
    exact = reg.prox_diag(z, d, 0.5, layout)
    cold = reg.solve_diag(z, d, 0.5, layout, rtol=1e-3, check=False)
    assert cold.iters == reg.newton_cold_iter and torch.allclose(cold.y, exact, atol=1e-10)
    z2 = z * 1.001
    hot = reg.solve_diag(z2, d, 0.5, layout, rtol=1e-3, check=False, warm=cold.warm)
    assert hot.iters == reg.newton_fixed_iter
    assert hot.residual <= 1e-3 * torch.linalg.vector_norm(d * z2)
