"""training: the one order (seed, network, loaders, parts), and the test read apart."""

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from stage_utils import tiny_overrides

from cifar_resnet import pipeline, training
from cifar_resnet.config import train_settings
from cifar_resnet.stages import CONF_DIR

CPU = torch.device("cpu")


def tiny_settings(tiny, tmp_path, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*tiny_overrides(tiny, tmp_path), "~recipe", "train.epochs=1", *extra],
        )
    return train_settings(cfg)


def test_prepare_refuses_a_precision_that_was_not_resolved(tiny_cifar, tmp_path):
    settings = tiny_settings(tiny_cifar, tmp_path)
    assert settings.train.precision == "auto"
    splits = pipeline.load_data(settings.data)
    with pytest.raises(ValueError, match="resolved"):
        training.prepare(settings, splits, CPU)


def test_the_seed_fixes_the_starting_weights_whatever_ran_before(tiny_cifar, tmp_path):
    settings, _ = pipeline.prepare_machine(tiny_settings(tiny_cifar, tmp_path))
    splits = pipeline.load_data(settings.data)
    first = training.prepare(settings, splits, CPU).parts.model.state_dict()
    torch.rand(1000)  # whatever the process did in between
    again = training.prepare(settings, splits, CPU).parts.model.state_dict()
    other = training.prepare(dataclasses.replace(settings, seed=1), splits, CPU)
    for key, value in first.items():
        torch.testing.assert_close(again[key], value)
    head = [k for k in first if k.endswith("weight")][-1]
    assert not torch.equal(other.parts.model.state_dict()[head], first[head])


def test_train_then_test_once_reads_the_chosen_checkpoint(tiny_cifar, tmp_path):
    settings, _ = pipeline.prepare_machine(tiny_settings(tiny_cifar, tmp_path, "train.tta=flip"))
    splits = pipeline.load_data(settings.data)
    run, state = training.train(settings, splits, CPU, checkpoint_dir=tmp_path / "ckpt")
    assert state.epoch == 1 and (tmp_path / "ckpt" / "best.pt").is_file()
    metrics, logits = training.test_once(run, tmp_path / "ckpt")
    assert set(metrics) == {"test_acc", "test_loss", "test_acc_tta_flip"}
    assert logits.shape == (len(splits.test_labels), 10) and logits.dtype == torch.float32
