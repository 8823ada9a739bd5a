"""engine: which weights are evaluated, what a checkpoint holds and how it loads."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from cifar_resnet import engine
from cifar_resnet.optim import Lookahead, ModelEMA


def parts_with(lookahead: bool, ema: bool) -> engine.TrainingParts:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    parts = engine.TrainingParts(
        model,
        optimizer,
        scheduler,
        lookahead=Lookahead(model.parameters(), k=5, alpha=0.5) if lookahead else None,
        ema=ModelEMA(model, 0.9) if ema else None,
    )
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):  # fewer than k: the fast weights have left the slow ones
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if parts.lookahead:
            parts.lookahead.step()
        if parts.ema:
            parts.ema.update(model)
    return parts


def test_lookahead_runs_are_evaluated_on_their_slow_weights():
    parts = parts_with(lookahead=True, ema=False)
    evaluated = parts.eval_model()
    assert evaluated is not parts.model  # a copy: training goes on from the fast weights
    for p, slow, fast in zip(
        evaluated.parameters(), parts.lookahead.slow, parts.model.parameters()
    ):
        torch.testing.assert_close(p, slow)
        assert not torch.equal(p, fast)
    torch.testing.assert_close(evaluated[1].running_mean, parts.model[1].running_mean)


def test_the_ema_wins_over_lookahead_and_the_plain_model_is_itself():
    both = parts_with(lookahead=True, ema=True)
    assert both.eval_model() is both.ema.module
    plain = parts_with(lookahead=False, ema=False)
    assert plain.eval_model() is plain.model


def test_lookahead_sync_puts_the_slow_weights_into_the_model():
    parts = parts_with(lookahead=True, ema=False)
    parts.lookahead.sync()
    for p, slow in zip(parts.model.parameters(), parts.lookahead.slow):
        assert torch.equal(p, slow)


def test_a_checkpoint_loads_weights_only_and_restores_every_generator(tmp_path):
    parts = parts_with(lookahead=True, ema=True)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = engine.TrainState(
        epoch=2, best_val_acc=0.5, best_epoch=1, history=[{"train_loss": 1.0}, {"train_loss": 0.5}]
    )
    engine.save_checkpoint(tmp_path / "last.pt", parts, state, {"config": "seed: 0\n"})
    expected = (random.random(), np.random.rand(), torch.rand(1))

    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)  # no pickled objects
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restored = engine.restore(parts_with(lookahead=True, ema=True), checkpoint)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
    assert restored == state and checkpoint["config"] == "seed: 0\n"


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"parts": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        engine.load_checkpoint(tmp_path / "evil.pt")
