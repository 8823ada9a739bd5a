import math

import pytest
import torch

from cifar_resnet.optim import (
    SAM,
    Lookahead,
    ModelEMA,
    Muon,
    build_optimizer,
    build_scheduler,
    orthogonalise,
    param_groups,
)


def test_lookahead_matches_hand_computation():
    # One scalar, plain SGD with lr 0.1 on f(w) = w^2 / 2 (gradient w), k=2, alpha=0.5.
    w = torch.nn.Parameter(torch.tensor([1.0]))
    sgd = torch.optim.SGD([w], lr=0.1)
    lookahead = Lookahead([w], k=2, alpha=0.5)
    for _ in range(4):
        sgd.zero_grad()
        (w**2 / 2).sum().backward()
        sgd.step()
        lookahead.step()
    # fast: 1 -> 0.9 -> 0.81; sync: slow = 1 + 0.5 * (0.81 - 1) = 0.905
    # fast: 0.905 -> 0.8145 -> 0.73305; sync: slow = 0.905 + 0.5 * (0.73305 - 0.905) = 0.819025
    assert w.item() == pytest.approx(0.819025, abs=1e-6)
    assert lookahead.slow[0].item() == pytest.approx(0.819025, abs=1e-6)


def test_lookahead_state_round_trip():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    la = Lookahead([w], k=3, alpha=0.8)
    la.step()
    other = Lookahead([torch.nn.Parameter(torch.zeros(2))], k=3, alpha=0.8)
    other.load_state_dict(la.state_dict())
    assert other.fast_steps == 1 and torch.equal(other.slow[0], la.slow[0])


def test_ema_matches_hand_computation():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9, warmup_steps=0)
    for value in (2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 0.9 * 1 + 0.1 * 2 = 1.1; 0.9 * 1.1 + 0.1 * 3 = 1.29
    assert ema.module.weight.item() == pytest.approx(1.29)


def test_onecycle_values():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([w], "sgd", lr=0.1, weight_decay=0.0)
    sched = build_scheduler(
        opt, "onecycle", total_steps=100, pct_start=0.25, div_factor=25.0, final_div_factor=1e4
    )
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 25)
    peak = max(range(100), key=lrs.__getitem__)
    assert peak == 24  # the warm-up ends after pct_start of the steps (step index 0.25*100 - 1)
    assert lrs[peak] == pytest.approx(0.1)
    # cosine annealing from the peak: half way down, the lr is the mean of peak and floor
    floor = 0.1 / 25 / 1e4
    assert lrs[99] == pytest.approx(floor, rel=1e-3)
    mid = 24 + (99 - 24) // 2
    expected = floor + (0.1 - floor) * (1 + math.cos(math.pi * (mid - 24) / 75)) / 2
    assert lrs[mid] == pytest.approx(expected, rel=1e-6)


def test_unknown_optimizer_and_schedule():
    w = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer([w], "rmsprop", lr=0.1, weight_decay=0.0)
    opt = build_optimizer([w], "sgd", lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(opt, "step", total_steps=10)


@pytest.mark.parametrize("total_steps", [3, 4, 8])
def test_onecycle_survives_tiny_runs(total_steps):
    w = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([w], "sgd", lr=0.1, weight_decay=0.0)
    sched = build_scheduler(opt, "onecycle", total_steps=total_steps, pct_start=0.25)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < max(lrs) <= 0.1 and lrs[-1] < max(lrs)


def test_lookahead_reset_takes_the_current_weights():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    la = Lookahead([w], k=1, alpha=0.5)
    with torch.no_grad():
        w.fill_(5.0)  # e.g. weights loaded to fine-tune from
    la.reset()
    la.step()
    assert w.item() == 5.0


def test_lookahead_ramp_starts_free_and_ends_at_alpha():
    w = torch.nn.Parameter(torch.tensor([0.0]))
    la = Lookahead([w], k=1, alpha=0.2, ramp_steps=10)
    alphas = []
    for _ in range(12):
        with torch.no_grad():
            w.add_(1.0)  # a "fast" step of +1
        la.step()
        alphas.append(la.current_alpha())
    # alpha_t = 1 - 0.8 * (t / 10) ** 3, then flat at 0.2 after the ramp
    assert alphas[4] == pytest.approx(1 - 0.8 * 0.5**3)
    assert alphas[9:] == pytest.approx([0.2, 0.2, 0.2])
    # Hand computation of the first two syncs: alpha 1 - 0.8e-3, then 1 - 6.4e-3.
    w2 = torch.nn.Parameter(torch.tensor([0.0]))
    la2 = Lookahead([w2], k=1, alpha=0.2, ramp_steps=10)
    slow = 0.0
    for t in (1, 2):
        with torch.no_grad():
            w2.add_(1.0)
        fast = w2.item()
        la2.step()
        alpha = 1 - 0.8 * (t / 10) ** 3
        slow = slow + alpha * (fast - slow)
        assert w2.item() == pytest.approx(slow)


def test_param_groups_scale_the_norm_learning_rate_and_keep_its_decay_rate():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=True),
        torch.nn.BatchNorm2d(4),
        torch.nn.Linear(4, 2, bias=False),
    )
    groups = param_groups(model, weight_decay=1e-3, norm_lr_scale=64.0, norm_decay=True)
    opt = build_optimizer(groups, "sgd", lr=0.5, weight_decay=1e-3)
    by_size = {sum(p.numel() for p in g["params"]): g for g in opt.param_groups}
    weights, conv_bias, norm = by_size[3 * 4 * 9 + 4 * 2], by_size[4], by_size[8]
    assert (weights["lr"], weights["weight_decay"]) == (0.5, 1e-3)
    assert (conv_bias["lr"], conv_bias["weight_decay"]) == (0.5, 0.0)
    assert norm["lr"] == 32.0 and norm["lr"] * norm["weight_decay"] == pytest.approx(0.5 * 1e-3)
    assert param_groups(model, 1e-3, 64.0)[-1]["weight_decay"] == 0.0  # norm_decay off
    # The schedule peaks at each group's own scaled rate.
    sched = build_scheduler(opt, "onecycle", total_steps=10, pct_start=0.3)
    peaks = {id(g): 0.0 for g in opt.param_groups}
    for _ in range(10):
        for g in opt.param_groups:
            peaks[id(g)] = max(peaks[id(g)], g["lr"])
        opt.step()
        sched.step()
    assert peaks[id(norm)] == pytest.approx(32.0) and peaks[id(weights)] == pytest.approx(0.5)


def test_orthogonalise_keeps_singular_vectors_and_evens_out_singular_values():
    # A 16 x 48 matrix with known singular vectors and singular values spread 20x.
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(16, 16, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(48, 16, generator=gen)).Q
    s = torch.linspace(1.0, 20.0, 16)
    matrix = u @ torch.diag(s) @ v.T
    for m, (left, right) in ((matrix, (u, v)), (matrix.T, (v, u))):  # wide and tall
        out = orthogonalise(m, steps=5).float()
        assert out.shape == m.shape and out.dtype == m.dtype
        core = left.T @ out @ right  # diagonal if the singular vectors are kept
        diagonal = torch.diagonal(core)
        assert (core - torch.diag(diagonal)).abs().max() < 0.05
        assert diagonal.min() > 0.5 and diagonal.max() < 1.5  # was 1 to 20
    # The input's scale does not matter (up to bf16 rounding).
    scaled, plain = orthogonalise(matrix * 1e3), orthogonalise(matrix)
    assert (scaled - plain).norm() < 0.05 * plain.norm()


def _quadratic_grads(params, targets):
    loss = sum(((p - t) ** 2).sum() / 2 for p, t in zip(params, targets))
    loss.backward()


def test_muon_plain_groups_step_like_torch_sgd():
    torch.manual_seed(0)
    target = torch.randn(5, 3)
    ours = torch.nn.Parameter(torch.randn(5, 3))
    ref = torch.nn.Parameter(ours.detach().clone())
    muon = Muon([ours], lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    for _ in range(4):
        for opt, p in ((muon, ours), (sgd, ref)):
            opt.zero_grad()
            _quadratic_grads([p], [target])
            opt.step()
    assert torch.allclose(ours, ref, atol=1e-6)


def test_muon_filter_step_matches_hand_computation():
    torch.manual_seed(0)
    filters = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
    target = torch.randn(4, 2, 3, 3)
    muon = Muon([{"params": [filters], "orthogonal": True}], lr=0.05, momentum=0.6)
    expected, buffer = filters.detach().clone(), None
    for _ in range(3):
        muon.zero_grad()
        _quadratic_grads([filters], [target])
        grad = filters.grad.detach().clone()
        buffer = grad.clone() if buffer is None else 0.6 * buffer + grad
        nesterov = grad + 0.6 * buffer
        expected = expected * (2.0 / expected.norm())  # norm sqrt(out_channels) = 2
        expected = expected - 0.05 * orthogonalise(nesterov.reshape(4, -1)).view(4, 2, 3, 3)
        muon.step()
        assert torch.allclose(filters.detach(), expected, atol=1e-5)


def test_muon_groups_from_param_groups():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=True),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2, bias=False),
    )
    groups = param_groups(
        model, weight_decay=1e-3, norm_lr_scale=64.0, norm_decay=True, orthogonal_filters=True
    )
    opt = build_optimizer(
        groups, "muon", lr=0.5, weight_decay=1e-3, momentum=0.85, muon_lr=0.2, muon_momentum=0.6
    )
    assert isinstance(opt, Muon)
    [filters] = [g for g in opt.param_groups if g["orthogonal"]]
    assert filters["params"] == [model[0].weight]
    assert (filters["lr"], filters["momentum"], filters["weight_decay"]) == (0.2, 0.6, 0.0)
    head = opt.param_groups[0]  # the group whose lr MLflow logs
    assert head["params"] == [model[3].weight] and (head["lr"], head["momentum"]) == (0.5, 0.85)
    # Each group peaks at its own rate: Muon's lr is not scaled by the base lr.
    sched = build_scheduler(opt, "onecycle", total_steps=10, pct_start=0.0, div_factor=1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5, 32.0, 0.2])
    sched.step()
    # Without marked filters there is nothing for Muon to do: a clear error, not plain SGD.
    with pytest.raises(ValueError, match="orthogonal"):
        build_optimizer(param_groups(model, 1e-3), "muon", lr=0.5, weight_decay=1e-3)


def test_separate_groups_leave_the_default_groups_and_come_last():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4))
    bias = model[0].bias
    groups = param_groups(
        model, 1e-3, 64.0, separate=[{"params": [bias], "lr_scale": 64.0, "anneal_steps": 3}]
    )
    assert groups[-1]["params"] == [bias] and groups[-1]["anneal_steps"] == 3
    assert sum(p is bias for g in groups for p in g["params"]) == 1


def _two_groups(schedule, anneal_steps=4):
    """An optimiser with a plain group at lr 0.5 and one at 4x that anneals, and its
    schedule (flat start: each group begins at its peak)."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    groups = [{"params": [a]}]
    if anneal_steps:
        groups.append({"params": [b], "lr_scale": 4.0, "anneal_steps": anneal_steps})
    opt = build_optimizer(groups, "sgd", lr=0.5, weight_decay=0.0)
    return opt, build_scheduler(opt, schedule, total_steps=10, pct_start=0.0, div_factor=1.0)


def _lrs(opt, sched, steps):
    """Each group's lr at each of ``steps`` steps."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("schedule", ["onecycle", "constant"])
def test_an_annealed_group_falls_linearly_to_zero_while_the_others_follow_the_schedule(schedule):
    seen = _lrs(*_two_groups(schedule), steps=10)
    assert [lr for _, lr in seen] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0, 0, 0, 0, 0, 0])
    # The plain group gets exactly what the schedule alone gives it.
    alone = _lrs(*_two_groups(schedule, anneal_steps=0), steps=10)
    assert [lr for lr, _ in seen] == pytest.approx([lr for (lr,) in alone])
    # A scheduler resumed from a state dict carries on where the first one stopped.
    first_opt, first = _two_groups(schedule)
    _lrs(first_opt, first, steps=2)
    opt, resumed = _two_groups(schedule)
    resumed.load_state_dict(first.state_dict())
    assert _lrs(opt, resumed, steps=2)[1] == pytest.approx(seen[3])


# SAM and ASAM on L(w) = (w1^2 + 4 w2^2) / 2, whose gradient is (w1, 4 w2), by hand.
CURVATURE = torch.tensor([1.0, 4.0])


def _sam_step(w, sam, lr=0.1):
    """One SAM step with plain SGD; returns the perturbed weights it took the gradient at."""
    sgd = torch.optim.SGD([w], lr=lr)
    sgd.zero_grad()
    (CURVATURE * w**2 / 2).sum().backward()
    start = w.detach().clone()
    assert sam.perturb()
    perturbed = w.detach().clone()
    sgd.zero_grad()
    (CURVATURE * w**2 / 2).sum().backward()
    sam.restore()
    assert torch.equal(w.detach(), start)  # back at w exactly, before the step
    sgd.step()
    return perturbed


def test_sam_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    perturbed = _sam_step(w, SAM([w], rho=0.1))
    # g = (1, 4), ||g|| = sqrt(17): e = 0.1 (1, 4) / sqrt(17)
    e = [0.1 / math.sqrt(17), 0.4 / math.sqrt(17)]
    assert perturbed.tolist() == pytest.approx([1 + e[0], 1 + e[1]])
    # The gradient at w + e is (1 + e1, 4 (1 + e2)); SGD at lr 0.1 steps from w with it.
    assert w.tolist() == pytest.approx([1 - 0.1 * (1 + e[0]), 1 - 0.4 * (1 + e[1])])


def test_asam_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    perturbed = _sam_step(w, SAM([w], rho=0.5, adaptive=True, eta=0.01))
    # g = (1, -8); T_w = |w| + 0.01 = (1.01, 2.01); T_w g = (1.01, -16.08);
    # e = 0.5 T_w^2 g / ||T_w g|| = 0.5 (1.01^2, -8 * 2.01^2) / sqrt(1.01^2 + 16.08^2)
    norm = math.sqrt(1.01**2 + 16.08**2)
    e = [0.5 * 1.01**2 / norm, 0.5 * -8 * 2.01**2 / norm]
    assert perturbed.tolist() == pytest.approx([1 + e[0], -2 + e[1]])
    assert w.tolist() == pytest.approx([1 - 0.1 * (1 + e[0]), -2 - 0.4 * (-2 + e[1])])


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_moves_nothing_for_a_zero_gradient_or_a_parameter_without_one(adaptive):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    unused = torch.nn.Parameter(torch.tensor([3.0]))
    sam = SAM([w, unused], rho=0.05, adaptive=adaptive)
    w.grad = torch.zeros(2)
    assert sam.perturb()
    assert w.tolist() == [1.0, -2.0] and unused.tolist() == [3.0] and unused.grad is None
    sam.restore()
    assert w.tolist() == [1.0, -2.0]


def test_sam_leaves_non_finite_gradients_unperturbed_when_asked_to_check():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    sam = SAM([w], rho=0.05)
    w.grad = torch.tensor([float("inf"), 1.0])
    assert sam.perturb(grad_scale=1024.0, check_finite=True) is False
    assert w.tolist() == [1.0, 2.0]
    # The scale of a GradScaler is divided out: scaled gradients give the same e.
    w.grad = torch.tensor([3.0, 4.0]) * 1024.0
    assert sam.perturb(grad_scale=1024.0, check_finite=True)
    assert w.tolist() == pytest.approx([1.0 + 0.05 * 0.6, 2.0 + 0.05 * 0.8])


@pytest.mark.parametrize("rho, eta", [(0.0, 0.01), (-0.05, 0.01), (float("nan"), 0.01), (0.05, -1)])
def test_sam_refuses_a_radius_not_above_zero_or_a_negative_eta(rho, eta):
    with pytest.raises(ValueError, match="SAM needs rho > 0 and eta >= 0"):
        SAM([torch.nn.Parameter(torch.zeros(1))], rho=rho, eta=eta)
