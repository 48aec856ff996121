"""The solvers do the maths of docs/solvers.md (and each class docstring): oracles in float64, identification, restarts, checkpoints."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from structkit.regularizers import Regularizer, list_regularizers, register_regularizer
from structkit.solvers import RAMDA, RMDA, ProxGen, ProxSGD, StageScheduler, get_solver

SOLVERS = {"ramda": (RAMDA, dict(lr=0.05, momentum=0.1)), "rmda": (RMDA, dict(lr=0.05, momentum=0.1)),
           "proxsgd": (ProxSGD, dict(lr=0.05)), "proxgen": (ProxGen, dict(lr=0.02))}


def quadratic_grads(w, target):
    """Gradient of 1/2 ||w - target||^2 + a little curvature coupling, deterministic."""
    return (w - target) + 0.1 * torch.roll(w, 1)


def test_ramda_with_lam_zero_is_madgrad_written_out_in_float64():
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 7, dtype=torch.float64)
    lr, c, eps = 0.03, 0.2, 1e-6
    opt = RAMDA([w], lr=lr, momentum=c, eps=eps)
    ref = follow_ramda_reference(opt, w, w.detach().clone(), target, lr=lr, c=c, eps=eps, steps=50)
    assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-10)


def follow_ramda_reference(opt, w, ref, target, *, lr, c, eps, steps, w_hat=None, ramp=False):
    """One stage of RAMDA written out (float64), stepped side by side with ``opt`` on ``w``; returns the reference
    iterate. ``w_hat(z, P, alpha)`` solves the subproblem (None: ``W_hat = z``, i.e. lam = 0, MADGRAD); ``ramp``:
    the final stage's ``c_t = min(c sqrt(t), 1)``."""
    w0, V, U, alpha = ref.clone(), torch.zeros_like(ref), torch.zeros_like(ref), 0.0
    for t in range(1, steps + 1):
        g = quadratic_grads(ref, target)
        s = lr * math.sqrt(t)
        alpha += s
        V += s * g
        U += s * g * g
        P = U ** (1 / 3) + eps
        z = w0 - V / P
        ct = min(c * math.sqrt(t), 1.0) if ramp else c
        ref = (1 - ct) * ref + ct * (z if w_hat is None else w_hat(z, P, alpha))
        w.grad = quadratic_grads(w.detach(), target)
        opt.step()
    return ref


def planted_problem(seed=0, n=300, groups=12, size=5, active=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, groups * size, generator=g)
    w_true = torch.zeros(groups, size)
    w_true[:active] = torch.randn(active, size, generator=g) + 1.0
    y = X @ w_true.reshape(-1) + 0.01 * torch.randn(n, generator=g)
    return X, y, w_true


@pytest.mark.parametrize("name", SOLVERS)
def test_planted_group_sparsity_is_identified_exactly(name):
    cls, kw = SOLVERS[name]
    X, y, w_true = planted_problem()
    W = torch.zeros_like(w_true, requires_grad=True)
    opt = cls([{"params": [W], "regularizer": "group_lasso", "lam": 0.03, "group_dim": 0}], **kw)
    sched = StageScheduler(opt, milestones=[3])
    for _ in range(4):
        for _ in range(150):
            opt.zero_grad()
            (0.5 * (X @ W.reshape(-1) - y).square().mean()).backward()
            opt.step()
        sched.step()
    norms = W.detach().norm(dim=1)
    # max |w| == 0, not a norm that underflows: the entries themselves are zero
    assert W.detach()[4:].abs().max() == 0, f"{name}: inactive groups not exactly zero: {norms}"
    assert (norms[:4] > 0.5).all(), f"{name}: active groups lost: {norms}"


def test_group_dim_zero_groups_filters_and_one_groups_input_channels():
    """The reference code's defect: filter-wise grouping silently never applied."""
    for dim in (0, 1):
        W = nn.Parameter(torch.randn(6, 4, 3, 3))
        opt = RAMDA([{"params": [W], "regularizer": "group_lasso", "lam": 0.5, "group_dim": dim}], lr=0.1, momentum=1.0)
        W.grad = torch.zeros_like(W)
        W.grad.select(dim, 1).fill_(-0.3)  # pushes one slice away from zero, the rest stays inside the threshold
        opt.step()
        other = 1 - dim
        slice_norms = W.detach().transpose(0, dim).reshape(W.shape[dim], -1).norm(dim=1)
        assert opt.group_layout(0).num_groups == W.shape[dim]
        assert (slice_norms == 0).sum() >= W.shape[dim] - 1, f"group_dim={dim} not applied: {slice_norms}"
        assert W.shape[other] != W.shape[dim]


def test_every_group_screened_to_zero_does_not_crash():
    W = nn.Parameter(torch.randn(8, 3, 3, 3))
    for cls in (RAMDA, ProxGen):
        for subproblem in ("exact", "pg"):
            w = nn.Parameter(W.detach().clone())
            opt = cls([{"params": [w], "regularizer": "group_lasso", "lam": 1e6, "group_dim": 0}], lr=0.1,
                      subproblem=subproblem)
            if cls is RAMDA:
                opt.param_groups[0]["momentum"] = 1.0  # the iterate is W_hat itself
            for _ in range(2):
                w.grad = torch.randn_like(w)
                opt.step()
            assert (w == 0).all(), (cls.__name__, subproblem)
            if subproblem == "pg":
                assert opt.solver_stats()["screened_fraction"] == 1.0


def test_restart_with_conv_weights_keeps_state_shapes_and_ramps_momentum():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    opt = RAMDA([{"params": [model[0].weight, model[2].weight], "regularizer": "group_lasso", "lam": 1e-3,
                  "group_dim": 1}, {"params": [model[0].bias, model[2].bias]}], lr=0.01, momentum=0.01)
    sched = StageScheduler(opt, milestones=[1, 2])
    x = torch.randn(2, 3, 9, 9)
    for epoch in range(3):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4) and opt.param_groups[0]["eps"] == pytest.approx(1e-8)
    assert opt.param_groups[0]["momentum_ramp"]
    state = opt.state[model[0].weight]
    assert state["step"] == 3 and state["V"].numel() == model[0].weight.numel() + model[2].weight.numel()
    # in the ramped stage c = min(c0 sqrt(t), 1): with c0 = 1 the iterate becomes W_hat immediately
    opt.param_groups[0]["momentum"] = opt.param_groups[1]["momentum"] = 1.0
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert torch.isfinite(model[0].weight).all()


def train_steps(opt, model, data, steps):
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", SOLVERS)
def test_state_dict_round_trip_is_bit_identical(name):
    cls, kw = SOLVERS[name]
    torch.manual_seed(0)
    data = (torch.randn(32, 10), torch.randint(0, 3, (32,)))
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

    def make(m):
        return cls([{"params": [m[0].weight], "regularizer": "group_lasso", "lam": 1e-2, "group_dim": 0},
                    {"params": [m[0].bias, m[2].weight, m[2].bias]}], **kw)

    ref_model = copy.deepcopy(model)
    ref_opt = make(ref_model)
    train_steps(ref_opt, ref_model, data, 10)

    opt = make(model)
    train_steps(opt, model, data, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    train_steps(opt2, resumed, data, 6)
    for a, b in zip(ref_model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@register_regularizer("test_elastic")
class Elastic(Regularizer):
    """A user regularizer registered in a test: |x| + x^2/2 (value + prox only)."""

    def value(self, x, layout):
        return x.abs().sum() + 0.5 * x.square().sum()

    def prox(self, x, tau, layout):
        tau = layout.expand(tau)
        return x.sign() * (x.abs() - tau).clamp_min(0) / (1 + tau)


@pytest.mark.parametrize("reg", list_regularizers())
@pytest.mark.parametrize("name", SOLVERS)
def test_every_regularizer_runs_with_every_solver(name, reg):
    cls, kw = SOLVERS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    opt = cls([{"params": [model[0].weight, model[3].weight], "regularizer": reg, "lam": 1e-2},
               {"params": [model[0].bias, model[3].bias]}], **kw)
    data = (torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,)))
    before = nn.functional.cross_entropy(model(data[0]), data[1]).item()
    train_steps(opt, model, data, 15)
    after = nn.functional.cross_entropy(model(data[0]), data[1]).item()
    assert math.isfinite(after) and after < before
    stats = opt.solver_stats()
    assert stats["steps"] == 15


def test_invalid_hyperparameters_are_rejected_with_clear_errors():
    p = [nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="Invalid lr"):
        RAMDA(p, lr=-1)
    with pytest.raises(ValueError, match="Invalid momentum"):
        RAMDA(p, momentum=0)
    with pytest.raises(ValueError, match="Invalid lam"):
        RMDA([{"params": p, "lam": -1e-3}])
    with pytest.raises(ValueError, match="Did you mean 'group_lasso'"):
        ProxSGD([{"params": p, "regularizer": "group_laso"}])
    with pytest.raises(ValueError, match="group_dim=2 is out of range"):
        opt = RAMDA([{"params": p, "regularizer": "group_lasso", "lam": 1.0, "group_dim": 2}])
        p[0].grad = torch.ones(3, 3)
        opt.step()
    with pytest.raises(ValueError, match="Did you mean 'ramda'"):
        get_solver("ramdaa")


def test_solver_runs_on_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to(device)
    opt = RAMDA([{"params": [model[2].weight], "regularizer": "group_lasso", "lam": 1e-2, "group_dim": 1},
                 {"params": [model[0].weight, model[0].bias, model[2].bias]}], lr=0.05, momentum=0.1)
    data = (torch.randn(32, 8, device=device), torch.randint(0, 2, (32,), device=device))
    train_steps(opt, model, data, 5)
    assert opt.state[model[2].weight]["V"].device.type == device.type


def test_ramda_finds_exact_group_zeros_on_digits_at_useful_accuracy():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    # a zero input column of the second layer removes a hidden neuron
    opt = RAMDA([{"params": [model[2].weight], "regularizer": "group_lasso", "lam": 1e-2, "group_dim": 1},
                 {"params": [model[0].weight, model[0].bias, model[2].bias]}], lr=0.01, momentum=0.1)
    steps_per_epoch = -(-len(train) // 64)
    sched = StageScheduler(opt, milestones=[10], epochs=12, steps_per_epoch=steps_per_epoch)
    for _ in range(12):
        order = train[torch.randperm(len(train), generator=g)]
        for b in range(0, len(order), 64):
            i = order[b:b + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i]), y[i]).backward()
            opt.step()
        sched.step()
    accuracy = (model(X[test]).argmax(1) == y[test]).float().mean().item()
    zero_neurons = int((model[2].weight.abs().amax(dim=0) == 0).sum())  # every entry zero, not an underflow
    assert accuracy >= 0.92 and zero_neurons >= 16, (accuracy, zero_neurons)


def exact_group_lasso_diag(z, d, T):
    """Reference: argmin_y 1/2 sum d (y - z)^2 + sum_g T_g ||y_g|| for row groups of a matrix, by bisection on
    each group's multiplier in float64 (a loop over groups: slow and obviously right)."""
    y = torch.zeros_like(z)
    for r in range(z.shape[0]):
        a, dr, t = d[r] * z[r], d[r], float(T[r])
        if a.norm() <= t:
            continue
        lo, hi = 0.0, 1.0
        while (a / (dr + hi)).norm() * hi < t:  # mu ||y(mu)|| increases with mu
            hi *= 2
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (a / (dr + mid)).norm() * mid < t else (lo, mid)
        y[r] = a / (dr + (lo + hi) / 2)
    return y


@pytest.mark.parametrize("method, tol", [("exact", 1e-12), ("auto", 1e-4)])
def test_ramda_with_group_lasso_follows_the_reference_update_in_float64(method, tol):
    """RAMDA's trajectory == the update written out (dual average, U^(1/3) preconditioner, exact subproblem by
    bisection, momentum ramp to 1 in the final stage). ``auto`` (inexact, the paper's stopping rule) stays close."""
    torch.manual_seed(0)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64) * torch.tensor([1, 1, 0.01, 1, 0.02, 1.0], dtype=torch.float64)[:, None]
    lr, c, eps, lam = 0.05, 0.2, 1e-6, 1.0
    opt = RAMDA([{"params": [w], "regularizer": "group_lasso", "lam": lam, "group_dim": 0}], lr=lr, momentum=c, eps=eps,
                subproblem=method)
    ref = w.detach().clone()
    weight = math.sqrt(5)
    for stage, steps in enumerate((30, 30)):
        if stage == 1:
            opt.restart(0.1, momentum_ramp=True)
            lr *= 0.1
            eps *= 0.1
        ref = follow_ramda_reference(
            opt, w, ref, target, lr=lr, c=c, eps=eps, steps=steps, ramp=stage == 1,
            w_hat=lambda z, P, alpha: exact_group_lasso_diag(z, P, torch.full((6,), alpha * lam * weight,
                                                                               dtype=torch.float64)))
        assert torch.allclose(w.detach(), ref, rtol=0, atol=tol), (stage, (w.detach() - ref).abs().max())
    zero_rows = ref.norm(dim=1) == 0
    assert zero_rows.any(), "the test should exercise exact zero groups"
    assert torch.equal(w.detach().norm(dim=1) == 0, zero_rows) and w.detach()[zero_rows].abs().max() == 0


def test_proxgen_with_group_lasso_follows_the_reference_update_in_float64():
    torch.manual_seed(1)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64) * torch.tensor([1, 1, 0.01, 1, 0.02, 1.0], dtype=torch.float64)[:, None]
    lr, (b1, b2), eps, lam = 0.05, (0.9, 0.999), 1e-8, 1.0
    opt = ProxGen([{"params": [w], "regularizer": "group_lasso", "lam": lam, "group_dim": 0}], lr=lr, subproblem="exact")
    ref, m, v = w.detach().clone(), torch.zeros(6, 5, dtype=torch.float64), torch.zeros(6, 5, dtype=torch.float64)
    for t in range(1, 41):
        g = quadratic_grads(ref, target)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        D = (v / (1 - b2 ** t)).sqrt() + eps
        z = ref - lr * (m / (1 - b1 ** t)) / D
        ref = exact_group_lasso_diag(z, D, torch.full((6,), lr * lam * math.sqrt(5), dtype=torch.float64))
        w.grad = quadratic_grads(w.detach(), target)
        opt.step()
    assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-12)
    assert (ref.norm(dim=1) == 0).any()


@pytest.mark.parametrize("name", SOLVERS)
def test_a_step_allocates_no_parameter_sized_memory(name):
    """State and work vectors are allocated once; later steps only allocate per-group vectors."""
    from torch.profiler import ProfilerActivity, profile
    cls, kw = SOLVERS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = cls([{"params": [model[0].weight, model[0].bias], "regularizer": "group_lasso", "lam": 1e-3,
                "group_index": [{"dim": 0, "offset": 0}, {"dim": 0, "offset": 0}]},
               {"params": [model[2].weight, model[2].bias]}], **kw)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    for _ in range(4):
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        if _ < 3:
            opt.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    smallest_regularized = model[0].weight.numel() * 4
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocations and max(allocations) < smallest_regularized / 8, sorted(allocations)[-5:]


def test_ramda_keeps_three_parameter_sized_state_vectors_for_the_group_lasso():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = RAMDA([{"params": list(model[0].parameters()), "regularizer": "group_lasso", "lam": 1e-3,
                  "group_index": [{"dim": 0, "offset": 0}, {"dim": 0, "offset": 0}]}], lr=0.01)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = opt.state[model[0].weight]
    n = sum(p.numel() for p in model[0].parameters())
    big = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.numel() == n)
    assert big == ["U", "V", "W0"]


def test_a_short_final_stage_still_ends_with_exact_zeros_when_the_scheduler_knows_its_length():
    """momentum 0.01 needs 10,000 steps to reach c = 1 on the paper's ramp; told the schedule's length, the
    scheduler ramps to 1 by the middle of a 60-step final stage, so the inactive groups end exactly zero."""
    cls = RAMDA
    X, y, w_true = planted_problem()
    results = {}
    for informed in (False, True):
        W = torch.zeros_like(w_true, requires_grad=True)
        opt = cls([{"params": [W], "regularizer": "group_lasso", "lam": 0.03, "group_dim": 0}], lr=0.05, momentum=0.01)
        extra = dict(epochs=4, steps_per_epoch=60) if informed else {}
        sched = StageScheduler(opt, milestones=[3], **extra)
        for _ in range(4):
            for _ in range(60):
                opt.zero_grad()
                (0.5 * (X @ W.reshape(-1) - y).square().mean()).backward()
                opt.step()
            sched.step()
        results[informed] = W.detach().abs().amax(dim=1)
    assert (results[True][4:] == 0).all() and (results[True][:4] > 0).all(), results[True]
    assert (results[False][4:] > 0).any(), "without the schedule's length the paper's ramp does not reach c = 1 here"


def test_schedules_without_a_final_stage_are_refused_with_the_fix():
    from structkit.solvers import final_stage_ramp_steps
    assert final_stage_ramp_steps([3], epochs=4, steps_per_epoch=40) == 20
    with pytest.raises(ValueError, match="no milestones"):
        final_stage_ramp_steps([], epochs=4, steps_per_epoch=10)
    with pytest.raises(ValueError, match="last milestone <= 3"):
        final_stage_ramp_steps([4], epochs=4, steps_per_epoch=10)
    with pytest.raises(ValueError, match="at least 2"):
        final_stage_ramp_steps([3], epochs=4, steps_per_epoch=1)
    with pytest.raises(ValueError, match="both epochs and steps_per_epoch"):
        StageScheduler(RAMDA([nn.Parameter(torch.zeros(2))]), milestones=[1], epochs=2)
