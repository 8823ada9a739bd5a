"""The machine at hand: which device, which precision, how many CPU threads.

Decided once, at the start of every stage, script and server, by the functions
here and nowhere else. The rule behind ``precision: auto`` is speed: bf16 only
where the hardware computes it natively. PyTorch accepts bf16 everywhere, but
where it emulates it (a CPU without AVX-512 BF16 or AMX, a GPU older than
Ampere) a training step is an order of magnitude slower than in fp32: measured
on an AVX2-only EPYC, 81 against 5 images/s for one step of whitened_resnet.

Imports only torch, so that serving may use it too.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .errors import UserError


class DeviceError(UserError, ValueError):
    """A device this machine does not have, or a name torch does not know."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it has bf16 instructions; a lower cap
# (AVX2, AVX512_CORE, ...) makes oneDNN emulate bf16 whatever the CPU flags say.
_ONEDNN_BF16_ISAS = (
    "AVX512_CORE_BF16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512_AMX_2",
    "ALL",
)


def resolve_device(
    name: str = "auto", *, cuda: bool | None = None, mps: bool | None = None
) -> torch.device:
    """``auto`` -> cuda, else mps (Apple silicon), else cpu; any other name as given.

    ``cuda``/``mps`` override what PyTorch reports (for tests). Raises DeviceError (a
    UserError and ValueError) for a device name torch does not know, and for cuda or mps
    on a machine that has none.
    """
    if name != "auto":
        device = requested_device(name)
        if device.type == "cuda" and not (torch.cuda.is_available() if cuda is None else cuda):
            raise DeviceError(f"device {name!r}: PyTorch sees no CUDA GPU here; use auto or cpu")
        if device.type == "mps" and not (_mps_available() if mps is None else mps):
            raise DeviceError(f"device {name!r}: PyTorch sees no MPS device here; use auto or cpu")
        return device
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return torch.device("cuda")
    return torch.device("mps" if (_mps_available() if mps is None else mps) else "cpu")


def requested_device(name: str) -> torch.device:
    """The device ``name`` asks for, without checking that this machine has it ("auto"
    is resolved). Raises DeviceError for a name torch does not know."""
    if name == "auto":
        return resolve_device(name)
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise DeviceError(
            f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps ({err})"
        ) from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def cpu_bf16_is_native(environ=os.environ) -> bool | None:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX) for PyTorch.

    ``False`` also where ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA cap PyTorch below
    those instructions (the kernels then emulate bf16 whatever the CPU flags say).
    ``None`` where this torch cannot tell (no ``torch.cpu._is_avx512_bf16_supported``).
    """
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is None or amx is None:
        return None
    if not (avx512_bf16() or amx()):
        return False
    capability = environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if capability in ("default", "avx2", "zvector", "vsx"):
        return False
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not isa or isa in _ONEDNN_BF16_ISAS


def cuda_bf16_is_native(device: torch.device) -> bool:
    """Compute capability 8.0 (Ampere) or newer; older GPUs only emulate bf16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(
    requested: str,
    device: torch.device,
    *,
    native_bf16: bool | None = None,
    measure: Callable[[torch.dtype | None], float] | None = None,
) -> str:
    """The precision a run uses: ``requested`` unless it is ``auto``.

    ``auto`` is ``bf16`` where ``device`` computes bf16 natively; otherwise ``fp32`` on
    a CPU and ``fp16`` (with a GradScaler, see ``needs_grad_scaler``) on CUDA. Where
    PyTorch cannot tell (an old torch, MPS) and ``measure`` is given, ``measure(dtype)``
    (images per second with that autocast dtype, None = fp32) decides: the faster of
    fp32 and bf16; without ``measure`` it stays fp32. ``native_bf16`` overrides the
    hardware check (for tests). Returns one of fp32, bf16, fp16; raises ValueError for
    an unknown name.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if native_bf16 is None:
        if device.type == "cuda":
            native_bf16 = cuda_bf16_is_native(device)
        elif device.type == "cpu":
            native_bf16 = cpu_bf16_is_native()
    if native_bf16:
        return "bf16"
    if device.type == "cuda":
        return "fp16"
    if native_bf16 is None and measure is not None:
        return "bf16" if measure(torch.bfloat16) > measure(None) else "fp32"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision: None for fp32 (no autocast)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(
            f"precision must be resolved to one of {', '.join(dtypes)} first, got {precision!r}"
        )
    return dtypes[precision]


def needs_grad_scaler(precision: str) -> bool:
    """fp16 underflows small gradients without loss scaling; bf16 has fp32's range."""
    return precision == "fp16"


def usable_cores(environ=os.environ) -> int:
    """Cores this process may run on: OMP_NUM_THREADS when set (torchrun sets it per
    rank), else the CPU affinity mask (a container's or taskset's share), else all."""
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads to ``threads``, or to ``usable_cores()`` when 0.

    Returns the number set. Raises ValueError for a negative count.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = every usable core), got {threads}")
    count = threads or usable_cores()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def machine_line(device: torch.device, requested: str, resolved: str) -> str:
    """What a stage prints at start: the device, the hardware, and the precision asked
    for and the one it resolved to."""
    return f"device {device}: {describe(device)}; precision {requested} -> {resolved}"


def cpu_class() -> str:
    """The CPU's class as BENCHMARKS.md names it: AMX, AVX-512 BF16, AVX-512, AVX2 or
    the capability PyTorch reports (after ATEN_CPU_CAPABILITY)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") and cpu_bf16_is_native():
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return "AMX" if amx else "AVX-512 BF16"
    return {"AVX512": "AVX-512"}.get(capability, capability)


def describe(device: torch.device) -> str:
    """One line naming the hardware: the GPU, or the CPU's vector class and threads."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if device.type == "mps":
        return "Apple MPS"
    bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 unknown"}
    return f"CPU {cpu_class()}, {bf16[cpu_bf16_is_native()]}, {torch.get_num_threads()} threads"
