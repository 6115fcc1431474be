"""Device selection, mixed precision and memory helpers (CUDA, MPS, CPU).

Everything device-specific of the engines lives here so that the predictor and the trainer
never branch on the device type themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from napari_muvit.engine.hardware import check_precision, cuda_capabilities, warn_if_slow
from napari_muvit.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")

_AMP_ALIASES: dict[object, str] = {
    "auto": "auto",
    True: "auto",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "off": "off",
    "none": "off",
    "fp32": "off",
    "float32": "off",
    False: "off",
    None: "off",
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` to run on.

    ``"auto"`` (or ``None``) picks CUDA, then Apple MPS, then CPU.  An explicit device that is
    not available raises :class:`~napari_muvit.errors.InputError` instead of silently falling
    back, so that a user who asked for the GPU learns that it is not used.
    """
    if isinstance(device, torch.device):
        name, spec = device.type, device
    else:
        text = "auto" if device is None else str(device).strip().lower()
        name = text.split(":", 1)[0]
        if name == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        if name not in DEVICE_CHOICES:
            raise InputError(
                f"device must be one of {', '.join(DEVICE_CHOICES)} (optionally 'cuda:N'), "
                f"got {device!r}"
            )
        try:
            spec = torch.device(text)
        except RuntimeError as err:
            raise InputError(f"device {device!r} is not a valid torch device: {err}") from None
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' was requested but CUDA is not available here")
        if spec.index is not None and spec.index >= torch.cuda.device_count():
            raise InputError(
                f"device {str(spec)!r} was requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
    if name == "mps" and not _mps_available():
        raise InputError("device 'mps' was requested but Apple MPS is not available here")
    return spec


def resolve_amp(amp: str | bool | None, device: torch.device, *, check: bool = True,
                dim: int = 128, head_dim: int = 32) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None`` = full float32).

    ``"auto"`` picks only what is native and faster here: bfloat16 on CUDA GPUs with native
    bf16 (compute capability >= 8), float16 on older tensor-core GPUs (>= 7), float32 on
    everything else, including every CPU: bf16 is 1.4-1.5x faster on CPUs with AVX512-BF16/AMX
    but changes a few labels, and is emulated (6-30x slower) elsewhere. An explicit ``"bf16"``
    or ``"fp16"`` is honoured; if ``check`` and the hardware emulates it (CPU: a one-off
    micro-timing of ``dim``/``head_dim``-shaped work), a
    :class:`~napari_muvit.engine.hardware.SlowPrecisionWarning` says how much slower it measured
    (once per process).
    """
    key = amp.strip().lower() if isinstance(amp, str) else amp
    if key not in _AMP_ALIASES:
        raise InputError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    mode = _AMP_ALIASES[key]
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        caps = cuda_capabilities(device) or {}
        if caps.get("native_bf16"):
            return torch.bfloat16
        return torch.float16 if caps.get("native_fp16") else None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    if check:
        warn_if_slow(device, dtype, dim, head_dim)
    return dtype


def validate_precision(choice: str, device: torch.device, dim: int = 128,
                       head_dim: int = 32) -> tuple[str, str | None]:
    """A remembered precision choice re-checked on this machine: ``(choice to use, message)``.

    A setting saved on a machine with native bf16 must not silently keep a 30x slower path on
    one without: an explicit ``"bf16"``/``"fp16"`` that measures slow here becomes ``"auto"``,
    with a one-line message for the panel (status and notification). Other choices pass.
    """
    dtype = resolve_amp(choice, device, check=False)
    if dtype is None or str(choice).strip().lower() == "auto":
        return choice, None
    check = check_precision(device, dtype, dim, head_dim)
    if not check.slow:
        return choice, None
    return "auto", f"remembered precision {choice!r} not used: {check.message}"


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``device`` with ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an accelerator out-of-memory error (CUDA or MPS)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(oom_type, type) and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory_bytes(device: torch.device) -> int | None:
    """Free accelerator memory in bytes, or ``None`` where it cannot be queried (CPU, MPS)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def release_cached_memory(device: torch.device) -> None:
    """Give cached allocator blocks back after an OOM so the retry sees the free memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()
