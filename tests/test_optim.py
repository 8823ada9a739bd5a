import math

import pytest
import torch

from cifar_resnet.optim import Lookahead, ModelEMA, build_optimizer, build_scheduler, param_groups


def test_lookahead_matches_hand_computation():
    # One scalar, plain SGD with lr 0.1 on f(w) = w^2 / 2 (gradient w), k=2, alpha=0.5.
    w = torch.nn.Parameter(torch.tensor([1.0]))
    sgd = torch.optim.SGD([w], lr=0.1)
    lookahead = Lookahead([w], k=2, alpha=0.5)
    for _ in range(4):
        sgd.zero_grad()
        (w ** 2 / 2).sum().backward()
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
    sched = build_scheduler(opt, "onecycle", max_lr=0.1, total_steps=100, pct_start=0.25,
                            div_factor=25.0, final_div_factor=1e4)
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
        build_scheduler(opt, "step", max_lr=0.1, total_steps=10)


@pytest.mark.parametrize("total_steps", [3, 4, 8])
def test_onecycle_survives_tiny_runs(total_steps):
    w = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([w], "sgd", lr=0.1, weight_decay=0.0)
    sched = build_scheduler(opt, "onecycle", max_lr=0.1, total_steps=total_steps, pct_start=0.25)
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
    for step in range(1, 13):
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
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4),
                                torch.nn.Linear(4, 2, bias=False))
    groups = param_groups(model, weight_decay=1e-3, norm_lr_scale=64.0, norm_decay=True)
    opt = build_optimizer(groups, "sgd", lr=0.5, weight_decay=1e-3)
    by_size = {sum(p.numel() for p in g["params"]): g for g in opt.param_groups}
    weights, conv_bias, norm = by_size[3 * 4 * 9 + 4 * 2], by_size[4], by_size[8]
    assert (weights["lr"], weights["weight_decay"]) == (0.5, 1e-3)
    assert (conv_bias["lr"], conv_bias["weight_decay"]) == (0.5, 0.0)
    assert norm["lr"] == 32.0 and norm["lr"] * norm["weight_decay"] == pytest.approx(0.5 * 1e-3)
    assert param_groups(model, 1e-3, 64.0)[-1]["weight_decay"] == 0.0  # norm_decay off
    # The schedule peaks at each group's own scaled rate.
    sched = build_scheduler(opt, "onecycle", max_lr=0.5, total_steps=10, pct_start=0.3)
    peaks = {id(g): 0.0 for g in opt.param_groups}
    for _ in range(10):
        for g in opt.param_groups:
            peaks[id(g)] = max(peaks[id(g)], g["lr"])
        opt.step()
        sched.step()
    assert peaks[id(norm)] == pytest.approx(32.0) and peaks[id(weights)] == pytest.approx(0.5)
