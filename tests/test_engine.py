"""engine: which weights are evaluated, what a checkpoint holds and how it loads."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from cifar_resnet import engine
from cifar_resnet.models import ImageClassifier, build_model
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


class StemBiasLog:
    """An EpochLogger that keeps the network's stem bias after each epoch."""

    def __init__(self, model):
        self.model, self.after_epoch = model, {}

    def log_epoch(self, epoch, metrics):
        self.after_epoch[epoch] = self.model.net.stem.bias.detach().clone()


def small_fit(model, epochs, *, lookahead=None, val=0, patience=0, logger=None):
    """engine.fit over 2 fixed batches of 8 random 32x32 images, SGD at a constant rate."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    parts = engine.TrainingParts(
        model,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        lookahead=lookahead,
    )
    val_images = images[:val].permute(0, 2, 3, 1).numpy()
    return parts, engine.fit(
        parts,
        lambda epoch: batches,
        val_images,
        labels[:val].numpy(),
        torch.device("cpu"),
        epochs=epochs,
        patience=patience,
        logger=logger,
        progress=False,
        channels_last=False,
    )


def airbench_classifier(**kwargs):
    torch.manual_seed(0)
    net = build_model("airbench_net", **kwargs)
    return ImageClassifier(net, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def test_fit_freezes_the_stem_bias_after_its_configured_epoch():
    model = airbench_classifier(stem_bias_epochs=2)
    log = StemBiasLog(model)
    start = model.net.stem.bias.detach().clone()
    small_fit(model, 4, logger=log)
    assert not torch.equal(log.after_epoch[1], start)
    assert not torch.equal(log.after_epoch[2], log.after_epoch[1])  # trained in epoch 2
    assert torch.equal(log.after_epoch[3], log.after_epoch[2])  # frozen from epoch 3 on
    assert torch.equal(log.after_epoch[4], log.after_epoch[2])


def test_the_last_epoch_ends_on_lookaheads_slow_weights_and_statistics():
    model = airbench_classifier(stem_bias_epochs=1)  # a parameter frozen mid-run stays in
    lookahead = Lookahead(model.parameters(), k=3, alpha=0.5, buffers=model.buffers())
    parts, _ = small_fit(model, 3, lookahead=lookahead)  # 6 steps: the last 0 since a pull
    evaluated = parts.eval_model()
    slow = dict(zip(map(id, lookahead.params), lookahead.slow))
    tensors = [*model.parameters(), *model.buffers()]
    synced = [t for t in tensors if id(t) in slow]
    assert any(t.ndim == 1 and not t.requires_grad and t.numel() == 256 for t in synced)
    for tensor in synced:
        assert torch.equal(tensor, slow[id(tensor)])
    for mine, theirs in zip(evaluated.state_dict().values(), model.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_patience_stops_after_that_many_epochs_without_a_better_val_acc():
    model = airbench_classifier()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.net.head[2].weight.requires_grad_(True)

    class NoLearning(torch.optim.SGD):  # the val_acc of epoch 1 is never beaten
        def step(self, closure=None):
            return None

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    optimizer = NoLearning([model.net.head[2].weight], lr=0.1)
    parts = engine.TrainingParts(
        model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    )
    state = engine.fit(
        parts,
        lambda epoch: [(images, labels)],
        images.permute(0, 2, 3, 1).numpy(),
        labels.numpy(),
        torch.device("cpu"),
        epochs=10,
        patience=2,
        progress=False,
        channels_last=False,
    )
    assert (state.epoch, state.best_epoch, state.stopped_early) == (3, 1, True)
