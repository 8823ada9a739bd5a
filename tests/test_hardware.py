"""hardware: device, precision and threads decided from the machine (faked here)."""

import pytest
import torch

from cifar_resnet import hardware

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_device_prefers_cuda_then_mps_then_cpu(cuda, mps, expected):
    assert hardware.resolve_device("auto", cuda=cuda, mps=mps).type == expected


def test_a_named_device_is_taken_as_given_and_a_bad_one_is_refused():
    assert hardware.resolve_device("cuda:1", cuda=True) == torch.device("cuda", 1)
    # A GPU this machine does not have is the user's to fix: one line, not a traceback.
    for name, flags in (
        ("cuda", {"cuda": False}),
        ("cuda:1", {"cuda": False}),
        ("mps", {"mps": False}),
    ):
        with pytest.raises(hardware.DeviceError, match="sees no"):
            hardware.resolve_device(name, **flags)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        hardware.resolve_device("gpu")


@pytest.mark.parametrize(
    "device, native, expected",
    [
        (CPU, True, "bf16"),  # AVX-512 BF16 or AMX
        (CPU, False, "fp32"),  # AVX2 only: bf16 would be emulated, ~16x slower
        (CUDA, True, "bf16"),  # Ampere or newer
        (CUDA, False, "fp16"),  # T4, V100: fp16 with a GradScaler
    ],
)
def test_auto_precision_is_bf16_only_where_native(device, native, expected):
    assert hardware.resolve_precision("auto", device, native_bf16=native) == expected


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_whatever_the_hardware(requested):
    for native in (True, False):
        assert hardware.resolve_precision(requested, CPU, native_bf16=native) == requested


def test_where_torch_cannot_tell_the_faster_measured_precision_wins():
    calls = []

    def measure(bf16_faster):
        def rate(dtype):
            calls.append(dtype)
            return {None: 100.0, torch.bfloat16: 150.0 if bf16_faster else 50.0}[dtype]

        return rate

    assert hardware.resolve_precision("auto", MPS, measure=measure(True)) == "bf16"
    assert hardware.resolve_precision("auto", MPS, measure=measure(False)) == "fp32"
    assert set(calls) == {None, torch.bfloat16}
    assert hardware.resolve_precision("auto", MPS) == "fp32"  # nothing to measure with


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        hardware.resolve_precision("half", CPU)
    with pytest.raises(ValueError, match="resolved"):
        hardware.autocast_dtype("auto")


@pytest.mark.parametrize(
    "flags, environ, expected",
    [
        ((False, False), {}, False),
        ((True, False), {}, True),
        ((False, True), {}, True),
        ((True, True), {"ATEN_CPU_CAPABILITY": "avx2"}, False),
        ((True, True), {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        ((True, False), {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False),
        ((True, False), {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, True),
    ],
)
def test_cpu_bf16_is_native_reads_the_flags_and_the_caps(monkeypatch, flags, environ, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags[0], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags[1], raising=False)
    assert hardware.cpu_bf16_is_native(environ) is expected


def test_an_old_torch_without_the_flag_functions_cannot_tell(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert hardware.cpu_bf16_is_native({}) is None


@pytest.mark.parametrize(
    "capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_cuda_auto_precision_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert hardware.resolve_precision("auto", CUDA) == expected


def test_the_grad_scaler_is_for_fp16_only():
    assert [hardware.needs_grad_scaler(p) for p in ("fp32", "bf16", "fp16")] == [False, False, True]
    assert [hardware.autocast_dtype(p) for p in ("fp32", "bf16", "fp16")] == [
        None,
        torch.bfloat16,
        torch.float16,
    ]


def test_threads_follow_omp_num_threads_else_the_affinity_mask():
    assert hardware.usable_cores({"OMP_NUM_THREADS": "3"}) == 3
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert hardware.usable_cores({}) == expected
    assert hardware.usable_cores({"OMP_NUM_THREADS": "0"}) == expected


def test_configure_threads_sets_torch_and_refuses_negative_counts():
    before = torch.get_num_threads()
    try:
        assert hardware.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert hardware.configure_threads(0) == hardware.usable_cores()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        hardware.configure_threads(-1)


def test_cpu_class_names_the_vector_class(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert hardware.cpu_class() == "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(hardware, "cpu_bf16_is_native", lambda environ=None: False)
    assert hardware.cpu_class() == "AVX-512"
    monkeypatch.setattr(hardware, "cpu_bf16_is_native", lambda environ=None: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert hardware.cpu_class() == "AMX"
    assert "AMX" in hardware.describe(CPU)
