"""engine: which weights are evaluated, what a checkpoint holds and how it loads, and
how a step with SAM composes with BatchNorm, the GradScaler and resume."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from cifar_resnet import engine
from cifar_resnet.models import ImageClassifier, build_model
from cifar_resnet.optim import SAM, Lookahead, ModelEMA, build_scheduler


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


# --------------------------------------------------------------------------- SAM

CPU = torch.device("cpu")


def linear_bn() -> nn.Module:
    """Four features to three logits through a BatchNorm, whose statistics follow the weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def feature_batches(count: int = 1):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(count)
    ]


def one_epoch(model, batches, *, sam, scaler=None, amp_dtype=None, grad_clip=0.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return engine.train_one_epoch(
        model,
        batches,
        optimizer,
        scheduler,
        CPU,
        amp_dtype=amp_dtype,
        scaler=scaler,
        sam=sam,
        grad_clip=grad_clip,
        channels_last=False,
    )


def test_sam_updates_batchnorm_running_statistics_once_a_batch():
    model = linear_bn()
    [(x, y)] = feature_batches()
    with torch.no_grad():
        features = model[0](x)  # what the BatchNorm sees at w, in the first pass
    # From the initial statistics (0, 1) at PyTorch's momentum of 0.1, once.
    expected_mean, expected_var = 0.1 * features.mean(0), 0.9 + 0.1 * features.var(0)
    one_epoch(model, [(x, y)], sam=SAM(model.parameters(), rho=0.5))
    bn = model[1]
    assert bn.num_batches_tracked.item() == 1 and bn.track_running_stats
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)


def test_sam_under_a_grad_scaler_steps_as_unscaled_fp16_and_clips_the_second_gradient():
    batches = feature_batches()
    steps = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = linear_bn()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        sam = SAM(model.parameters(), rho=0.5)
        one_epoch(model, batches, sam=sam, scaler=scaler, amp_dtype=torch.float16, grad_clip=0.1)
        steps.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    torch.testing.assert_close(steps[1], steps[0])
    # One SGD step of lr 0.5 with the gradient at w + e clipped to norm 0.1 (it is larger).
    assert steps[0].norm().item() == pytest.approx(0.5 * 0.1, rel=1e-3)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_nothing_perturbed():
    model = linear_bn()
    before = [p.detach().clone() for p in model.parameters()]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # fp16 gradients overflow
    sam = SAM(model.parameters(), rho=0.5)
    one_epoch(model, feature_batches(), sam=sam, scaler=scaler, amp_dtype=torch.float16)
    assert len(forwards) == 1  # no second pass at a perturbation made of inf
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**119  # lowered, as GradScaler does without SAM


class Interrupted(Exception):
    pass


class StopAfter:
    """An EpochLogger that stops the run when told of ``epoch``: its checkpoint is written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def log_epoch(self, epoch, metrics):
        if epoch == self.epoch:
            raise Interrupted


def parts_for_resume(adaptive: bool | None) -> engine.TrainingParts:
    """A small conv net with Lookahead (k=3: a pull inside each 2-step epoch's reach), an
    EMA, a one-cycle schedule over 2 epochs, and SAM (``adaptive`` None: without)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    model = ImageClassifier(net, (0.5,) * 3, (0.25,) * 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    return engine.TrainingParts(
        model,
        optimizer,
        build_scheduler(optimizer, "onecycle", total_steps=4),
        lookahead=Lookahead(model.parameters(), k=3, alpha=0.5),
        ema=ModelEMA(model, 0.9),
        sam=None if adaptive is None else SAM(model.parameters(), 0.05, adaptive=adaptive),
    )


def fit_two_epochs(parts, **kwargs):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    empty = np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64)
    return engine.fit(
        parts,
        lambda epoch: batches,
        *empty,
        CPU,
        epochs=2,
        progress=False,
        channels_last=False,
        **kwargs,
    )


@pytest.mark.parametrize("adaptive", [None, False, True], ids=["no-sam", "sam", "asam"])
def test_a_run_resumed_after_epoch_1_equals_the_uninterrupted_one(tmp_path, adaptive):
    whole = parts_for_resume(adaptive)
    fit_two_epochs(whole)
    with pytest.raises(Interrupted):
        fit_two_epochs(parts_for_resume(adaptive), checkpoint_dir=tmp_path, logger=StopAfter(1))
    resumed = parts_for_resume(adaptive)
    state = engine.restore(resumed, engine.load_checkpoint(tmp_path / "last.pt"))
    assert state.epoch == 1
    fit_two_epochs(resumed, state=state)
    for mine, theirs in ((whole.model, resumed.model), (whole.ema.module, resumed.ema.module)):
        for (key, tensor), other in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(tensor, other), key


def test_cutmix_targets_train_on_the_hand_mixed_cross_entropy():
    """Soft targets (CutMix's) give lam * CE(own label) + (1 - lam) * CE(partner's), label
    smoothing on both, and accuracy counts the targets' largest class."""
    from cifar_resnet.batch_augment import cutmix

    torch.manual_seed(0)
    model = ImageClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)), (0.5,) * 3, (0.25,) * 3
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (12,), generator=generator)
    mixed = cutmix(images, labels, 10, generator)
    assert (mixed.lam < 1).any()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the loss of these weights
    result = engine.train_one_epoch(
        model,
        [(mixed.images, mixed.targets)],
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        torch.device("cpu"),
        label_smoothing=0.1,
        channels_last=False,
    )
    with torch.no_grad():
        logits = model(mixed.images)
    own = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    other = nn.functional.cross_entropy(
        logits, labels.roll(1), label_smoothing=0.1, reduction="none"
    )
    expected = (mixed.lam * own + (1 - mixed.lam) * other).mean()
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)
    majority = mixed.targets.argmax(1)
    assert result.acc == pytest.approx((logits.argmax(1) == majority).float().mean().item())
