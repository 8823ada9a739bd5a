"""distributed: data-parallel training under torchrun, on the CPU with gloo.

Two processes with the global batch and seed of one give the same weights (the
sharding and the gradient averaging); a zoo model trained by two processes under
torchrun, stopped and resumed by two processes, is one MLflow run and one registered
version; and what cannot work is refused before anything is read."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ddp_steps import random_set, train_in_process, train_small
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from services import free_port
from stage_utils import REPO, make_experiment, stage_env, tiny_overrides

from cifar_resnet import data, distributed, engine, pipeline
from cifar_resnet.batch_augment import BatchAugment
from cifar_resnet.config import ConfigError, train_settings
from cifar_resnet.distributed import World
from cifar_resnet.stages import CONF_DIR

CPU = torch.device("cpu")
TRAIN = "cifar_resnet.stages.train"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


# --------------------------------------------------------------------------- the world


def test_the_world_comes_from_torchruns_environment():
    assert distributed.from_environment({}) == distributed.SINGLE
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = distributed.from_environment(env)
    assert world == World(rank=3, size=4, local_rank=1, local_size=2)
    assert world.distributed and not world.is_main
    with pytest.raises(ConfigError, match="does not fit together"):
        distributed.from_environment({**env, "RANK": "4"})
    with pytest.raises(ConfigError, match="not integers"):
        distributed.from_environment({**env, "RANK": "x"})


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused():
    assert distributed.per_rank_batch(96, World(0, 3, 0, 3)) == 32
    with pytest.raises(ConfigError) as err:
        distributed.per_rank_batch(100, World(0, 3, 0, 3))
    assert str(err.value) == (
        "train.batch_size=100 is the global batch and must divide evenly over the 3 "
        "processes; use a multiple of 3"
    )


def settings_from(tiny, tmp_path, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["recipe=fast", *tiny_overrides(tiny, tmp_path), *extra]
        )
    return train_settings(cfg)


def test_sync_bn_on_the_cpu_is_refused_before_any_data_is_read(tiny_cifar, tmp_path):
    settings = settings_from(tiny_cifar, tmp_path, "train.sync_bn=true", "train.device=cpu")
    with pytest.raises(ConfigError, match="train.sync_bn=true needs CUDA"):
        pipeline.prepare_machine(settings)
    distributed.check_sync_bn(True, torch.device("cuda"))  # where SyncBatchNorm runs
    distributed.check_sync_bn(False, CPU)


def test_prepare_machine_refuses_an_uneven_batch_and_gives_each_rank_its_gpu(tiny_cifar, tmp_path):
    settings = settings_from(tiny_cifar, tmp_path, "train.batch_size=33", "train.device=cpu")
    with pytest.raises(ConfigError, match="train.batch_size=33 is the global batch"):
        pipeline.prepare_machine(settings, World(1, 2, 1, 2))
    two = World(1, 2, 1, 2)
    assert distributed.training_device(torch.device("cuda"), two) == torch.device("cuda", 1)
    assert distributed.training_device(CPU, two) == CPU
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        distributed.training_device(torch.device("cuda:0"), two)
    with pytest.raises(ConfigError, match="cuda .NCCL. or cpu .gloo."):
        distributed.training_device(torch.device("mps"), two)


def test_run_params_name_world_size_backend_and_per_rank_batch():
    assert distributed.params(World(0, 2, 0, 2), CPU, 64) == {
        "world_size": 2,
        "dist_backend": "gloo",
        "per_rank_batch_size": 32,
    }
    assert distributed.params(distributed.SINGLE, CPU, 64)["dist_backend"] == "none"


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    "augment",
    [
        BatchAugment(crop_pad=2, flip="random", cutout=4),
        # CutMix pairs images across the processes' slices, so it runs on the global batch.
        BatchAugment(crop_pad=2, flip="random", policy="trivial_augment_wide", cutmix=0.5),
    ],
    ids=["translate_flip_cutout", "trivial_augment_cutmix"],
)
def test_the_tensor_loaders_shards_make_one_process_batches(augment):
    images, labels = random_set()
    mix = functools.partial(augment.mix, num_classes=10) if augment.cutmix else None

    def batches(rank=0, world_size=1):
        loader = data.TensorLoader(
            images, labels, 16, CPU, shuffle=True, augment=augment, seed=5, rank=rank,
            world_size=world_size, mix=mix,
        )  # fmt: skip
        return list(loader.iter_epoch(2))

    whole, shards = batches(), [batches(r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) == 4  # the same steps an epoch
    for step, (x, y) in enumerate(whole):
        torch.testing.assert_close(torch.cat([s[step][0] for s in shards]), x)
        torch.testing.assert_close(torch.cat([s[step][1] for s in shards]), y)
    assert [len(s[0][1]) for s in shards] == [8, 8]
    assert whole[0][1].shape == ((16, 10) if mix else (16,))


def test_the_albumentations_path_shards_with_a_distributed_sampler():
    images, labels = random_set(n=50)
    index = np.arange(50)  # labels carry the image's index, to see who got what
    seen = []
    for rank in range(2):
        loader = data.make_loader(
            images, index, 8, shuffle=True, drop_last=True, seed=1, epoch=3, rank=rank,
            world_size=2,
        )  # fmt: skip
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert loader.sampler.epoch == 3
        seen.append(torch.cat([y for _, y in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 24  # 25 each, in 3 whole batches of 8
    assert not set(seen[0]) & set(seen[1])
    again = data.make_loader(
        images, index, 8, shuffle=True, drop_last=True, seed=1, epoch=4, world_size=2
    )
    assert torch.cat([y for _, y in again]).tolist() != seen[0]  # set_epoch reshuffles


# --------------------------------------------------------------------------- DDP = one process


def test_two_processes_train_the_weights_one_process_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(train_in_process, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    one = train_small(distributed.SINGLE)
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, tensor in one["weights"].items():
            torch.testing.assert_close(two["weights"][key], tensor, rtol=1e-5, atol=1e-6)
        for epoch_one, epoch_two in zip(one["history"], two["history"]):
            for key in ("train_loss", "train_acc", "lr"):
                assert epoch_two[key] == pytest.approx(epoch_one[key], rel=1e-5), key


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_ranks_stopped_and_resumed_make_one_run_and_one_version(tiny_cifar, tmp_path):
    env = {
        **stage_env(tmp_path),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",  # a second less to stop each run
    }
    make_experiment(tmp_path, "tests")
    args = tiny_overrides(
        tiny_cifar,
        tmp_path,
        **{
            "train.epochs": 2,
            "train.batch_size": 64,
            # 450 images an epoch: the signal lands in epoch 2, long before it ends.
            "data.repeats": 3,
            "optim.lr": 0.05,  # recipe=fast's rate blows up at 64-image batches
            "registry.model_name": "tiny-ddp",
        },
    )
    first = subprocess.Popen(
        [*TORCHRUN, "-m", TRAIN, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_id, lines = None, []
    for line in first.stdout:  # rank 0 alone prints the run and the epochs
        lines.append(line)
        if line.startswith("MLflow run "):
            run_id = line.split()[2]
        if line.startswith("epoch   1/2"):
            break
    first.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    output = "".join(lines) + first.communicate(timeout=120)[0]
    assert run_id, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    # KILLED as a rule; FAILED if rank 1 went first and rank 0's all-reduce broke before
    # its own SIGTERM was handled. Either is resumed (only FINISHED is refused).
    assert client.get_run(run_id).info.status in ("KILLED", "FAILED"), output[-3000:]
    last = engine.load_checkpoint(tmp_path / "checkpoints" / run_id / "last.pt")
    assert last["state"]["epoch"] == 1, "the run got past epoch 1; make epochs longer"

    resumed = subprocess.run(
        [
            *TORCHRUN,
            "-m",
            TRAIN,
            f"resume={run_id}",
            f"train.checkpoint_dir={tmp_path}/checkpoints",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed after epoch 1") == 1  # rank 0's word only
    assert resumed.stdout.count("MLflow run ") == 1

    experiment = client.get_experiment_by_name("tests").experiment_id
    [run] = client.search_runs([experiment])  # one run: rank 1 never made one
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    params = run.data.params
    assert (params["world_size"], params["dist_backend"]) == ("2", "gloo")
    assert params["per_rank_batch_size"] == "32" and params["train.batch_size"] == "64"
    for key in ("train_loss", "val_acc", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], key
    assert "test_acc" in run.data.metrics
    [version] = client.search_model_versions("name='tiny-ddp'")
    assert str(version.version) == "1" and version.run_id == run_id
