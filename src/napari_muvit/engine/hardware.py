"""What this machine does natively, and whether reduced precision is faster *here*.

bfloat16 autocast is 1.4-1.5x faster than float32 on a CPU with AVX512-BF16 or AMX, but it is
emulated elsewhere: on an AVX2 CPU the bundled model ran 30x *slower* in bf16. So a precision
choice is checked against the hardware before it is used:

* :func:`cpu_capabilities` / :func:`cuda_capabilities` read what the hardware has (CPU flags
  from ``/proc/cpuinfo`` and torch's dispatch level; CUDA compute capability);
* :func:`measure_amp_speedup` times a few milliseconds of model-shaped work (a linear layer,
  attention and a 3×3 convolution) in float32 and under autocast, once per process;
* :func:`check_precision` combines both into a verdict with a one-line message, which
  :func:`~napari_muvit.engine.device.resolve_amp` turns into a :class:`SlowPrecisionWarning`
  (the CLI prints it on stderr, the predict panel shows it) and
  :func:`~napari_muvit.engine.device.validate_precision` uses to re-validate a remembered
  choice on another machine;
* :func:`describe_runtime` is the one-line device / precision / threads / batch description
  shown by the CLI and the panel's model line.

This module sits below :mod:`napari_muvit.engine.device` (which imports it), so it never
imports the device helpers itself.
"""

from __future__ import annotations

import functools
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from napari_muvit.engine.threads import wait_policy

__all__ = [
    "CpuCapabilities",
    "PrecisionCheck",
    "SlowPrecisionWarning",
    "check_precision",
    "cpu_capabilities",
    "cuda_capabilities",
    "describe_runtime",
    "measure_amp_speedup",
]

#: a reduced precision measured below this speed-up is reported as slow (timing noise ~10 %)
SLOW_BELOW = 0.9


class SlowPrecisionWarning(UserWarning):
    """An explicitly chosen precision is emulated (slower than float32) on this hardware."""


@dataclass(frozen=True)
class CpuCapabilities:
    """CPU features that decide whether bf16/fp16 run natively."""

    model: str
    isa: str  # torch's CPU dispatch level: DEFAULT, AVX2, AVX512, ...
    avx512: bool
    avx512_bf16: bool
    amx_bf16: bool
    avx512_fp16: bool
    amx_fp16: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX-BF16)."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def native_fp16(self) -> bool:
        return self.avx512_fp16 or self.amx_fp16

    @property
    def short(self) -> str:
        """E.g. ``"AVX2, no native bf16"`` or ``"AVX512, AMX-BF16"``."""
        if self.amx_bf16:
            bf16 = "AMX-BF16"
        elif self.avx512_bf16:
            bf16 = "AVX512-BF16"
        else:
            bf16 = "no native bf16"
        return f"{self.isa}, {bf16}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "native_bf16": self.native_bf16}


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """CPU model name and feature flags (Linux); empty elsewhere."""
    name, flags = "", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> CpuCapabilities:
    """This CPU's relevant features (cached; reading them takes well under a millisecond)."""
    name, flags = _cpuinfo()
    isa = str(torch.backends.cpu.get_cpu_capability())
    mkldnn_bf16 = False
    if not flags:  # no /proc/cpuinfo (macOS, Windows): ask oneDNN
        try:
            mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            mkldnn_bf16 = False
    return CpuCapabilities(
        model=name or platform.processor() or platform.machine(),
        isa=isa,
        avx512="avx512f" in flags or isa.startswith("AVX512"),
        avx512_bf16="avx512_bf16" in flags or mkldnn_bf16,
        amx_bf16="amx_bf16" in flags,
        avx512_fp16="avx512_fp16" in flags,
        amx_fp16="amx_fp16" in flags,
    )


def cuda_capabilities(device: torch.device | int | None = None) -> dict[str, Any] | None:
    """Name, compute capability and native bf16/fp16 of a CUDA device (``None`` without CUDA).

    Native bf16 needs compute capability 8.0 (Ampere); fast fp16 (tensor cores) 7.0. Newer
    torch reports bf16 as "supported" on older GPUs too, through emulation: that is not used.
    """
    if not torch.cuda.is_available():
        return None
    index = device.index if isinstance(device, torch.device) else device
    index = torch.cuda.current_device() if index is None else int(index)
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "name": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "native_bf16": major >= 8,
        "native_fp16": major >= 7,
    }


# --------------------------------------------------------------------------------------------
# micro-timing
# --------------------------------------------------------------------------------------------


def _model_shaped_work(device: torch.device, dim: int, head_dim: int) -> Any:
    """A few ms of what a MuViT forward does: a token MLP, attention, a 3×3 head conv."""
    g = torch.Generator().manual_seed(0)
    tokens = 128
    heads = max(1, dim // 32)
    x = torch.randn(tokens, dim, generator=g).to(device)
    w = torch.randn(4 * dim, dim, generator=g).to(device) / dim**0.5
    q = torch.randn(1, heads, tokens, dim // heads, generator=g).to(device)
    img = torch.randn(1, head_dim, 32, 32, generator=g).to(device)
    conv = torch.randn(head_dim, head_dim, 3, 3, generator=g).to(device) / (3 * head_dim**0.5)

    def work() -> None:
        with torch.inference_mode():
            torch.nn.functional.linear(x, w)
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.nn.functional.conv2d(img, conv, padding=1)

    return work


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=16)
def _speedup(device_type: str, index: int | None, dtype: torch.dtype, dim: int,
             head_dim: int, repeats: int) -> float:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    work = _model_shaped_work(device, dim, head_dim)

    def once(dt: torch.dtype | None) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=dt, enabled=dt is not None):
            work()
        _sync(device)
        return time.perf_counter() - t0

    once(None)
    once(dtype)  # first calls create kernels / oneDNN primitives
    full, reduced = [], []
    for rep in range(repeats):  # alternate, so that load from other programs hits both
        order = (None, dtype) if rep % 2 == 0 else (dtype, None)
        for dt in order:
            (full if dt is None else reduced).append(once(dt))
    return min(full) / max(min(reduced), 1e-9)


def measure_amp_speedup(device: torch.device, dtype: torch.dtype, dim: int = 128,
                        head_dim: int = 32, repeats: int = 2) -> float:
    """float32 time / autocast-``dtype`` time of model-shaped work on ``device`` (> 1: faster).

    Cached per process and shape: a few milliseconds on native hardware, up to ~0.2 s where
    the precision is emulated (which is when it matters).
    """
    return _speedup(device.type, device.index, dtype, int(dim), int(head_dim), int(repeats))


# --------------------------------------------------------------------------------------------
# verdict
# --------------------------------------------------------------------------------------------


_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class PrecisionCheck:
    """Whether autocast ``dtype`` is a good idea on ``device``.

    ``native``: the hardware has it; ``speedup``: measured float32 time / autocast time
    (``None`` when not measured); ``slow``: it should not be used (emulated and measured slower);
    ``message``: one line for the user when ``slow``.
    """

    device: str
    dtype: str
    native: bool
    speedup: float | None
    slow: bool
    message: str | None


def _hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        caps = cuda_capabilities(device)
        if not caps:
            return "this GPU"
        return f"this GPU ({caps['name']}, compute capability {caps['capability']})"
    if device.type == "cpu":
        caps = cpu_capabilities()
        return f"this CPU ({caps.model or 'unknown model'}, {caps.short})"
    return f"this {device.type} device"


def check_precision(device: torch.device, dtype: torch.dtype | None, dim: int = 128,
                    head_dim: int = 32, measure: bool = True) -> PrecisionCheck:
    """Is autocast ``dtype`` on ``device`` native and faster than float32 here?

    CPU: native from the CPU flags, and (``measure``) a one-off micro-timing decides, because
    flags do not tell the whole story (oneDNN may lack kernels; a busy core). CUDA: native from
    the compute capability. MPS: fp16 is native, bf16 is not assumed.
    """
    if dtype is None:
        return PrecisionCheck(device.type, "float32", True, 1.0, False, None)
    name = _NAMES.get(dtype, str(dtype))
    if device.type == "cpu":
        caps = cpu_capabilities()
        native = caps.native_bf16 if dtype == torch.bfloat16 else caps.native_fp16
    elif device.type == "cuda":
        caps_cuda = cuda_capabilities(device) or {}
        native = bool(caps_cuda.get("native_bf16" if dtype == torch.bfloat16 else "native_fp16"))
    else:
        native = dtype == torch.float16
    speedup = None
    if measure and device.type == "cpu":
        speedup = measure_amp_speedup(device, dtype, dim, head_dim)
    slow = (speedup < SLOW_BELOW) if speedup is not None else not native
    message = None
    if slow:
        how = (f"measured {1 / speedup:.1f}x slower than float32" if speedup is not None
               else "not native, expect it to be slower than float32")
        message = (f"{name} is emulated on {_hardware_name(device)}: {how}; "
                   f"use precision 'auto' (float32 here)")
    return PrecisionCheck(device.type, name, native, speedup, slow, message)


_WARNED: set[tuple[str, str]] = set()


def warn_if_slow(device: torch.device, dtype: torch.dtype | None, dim: int = 128,
                 head_dim: int = 32) -> PrecisionCheck | None:
    """Warn once per process and (device, dtype) with :class:`SlowPrecisionWarning` if slow."""
    if dtype is None or (device.type, str(dtype)) in _WARNED:
        return None
    check = check_precision(device, dtype, dim, head_dim)
    if check.slow:
        _WARNED.add((device.type, str(dtype)))
        warnings.warn(check.message, SlowPrecisionWarning, stacklevel=3)
    return check


def describe_runtime(device: torch.device, dtype: torch.dtype | None,
                     threads: int | None = None, batch_size: int | None = None) -> str:
    """One line: device (and what it has), precision, threads and wait policy, batch size.

    E.g. ``"cpu (AMD EPYC 7B13, AVX2, no native bf16) · float32 · 2 threads, passive wait ·
    batch 4"``.
    """
    if device.type == "cpu":
        caps = cpu_capabilities()
        where = f"cpu ({caps.model}, {caps.short})" if caps.model else f"cpu ({caps.short})"
    elif device.type == "cuda":
        caps_cuda = cuda_capabilities(device)
        where = f"{device} ({caps_cuda['name']})" if caps_cuda else str(device)
    else:
        where = str(device)
    parts = [where, "float32" if dtype is None else f"{_NAMES.get(dtype, dtype)} autocast"]
    if device.type == "cpu":
        n = torch.get_num_threads() if threads is None else threads
        parts.append(f"{n} thread{'s' if n != 1 else ''}, {wait_policy().short}")
    if batch_size is not None:
        parts.append(f"batch {batch_size}")
    return " · ".join(parts)
