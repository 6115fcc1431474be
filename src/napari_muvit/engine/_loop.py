"""The optimisation loop shared by fine-tuning (:mod:`.train`) and MAE pre-training
(:mod:`.pretrain`): steps, progress reports, cancellation, the NaN guard, the learning-rate
schedule, atomic checkpoints and resuming.

Subclasses provide the model, the parameter groups, ``_batch(step)`` and ``train_step(batch)``
(which calls :meth:`TrainingLoop._optimize`), and may add state with ``_extra_state`` /
``_load_extra_state`` and metadata with ``_update_meta``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.device import resolve_amp, resolve_device
from napari_muvit.engine.threads import ThreadTuner
from napari_muvit.errors import InputError, MuViTError

# Training progress: one dict per step ({step, steps, loss, lr, elapsed, ...}); prediction
# progress (engine.predictor.Progress) is a different signature, (done, total, message).
StepProgress = Callable[[dict[str, Any]], None]
# The history kept in ``model.meta`` (live previews, a model saved from the panel) has its
# curves thinned to this many points; a checkpoint's history.json keeps every step.
META_HISTORY_POINTS = 500


class RunConfig:
    """Dict round trip shared by the run configurations (``TrainConfig``, ``PretrainConfig``):
    what checkpoints and ``--resume`` store."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (YAML/JSON/``weights_only``-safe)."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`, ignoring unknown keys (older/newer versions)."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})
CURVES = ("steps", "loss", "lr", "elapsed")


class TrainingDivergedError(MuViTError):
    """The loss or the gradients became NaN/inf; training stopped at the last good state."""


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_warmup(steps: int, warmup_steps: int | None) -> int:
    """5 % of the steps, at most 100, unless given."""
    return warmup_steps if warmup_steps is not None else min(100, steps // 20)


def now() -> str:
    """UTC timestamp for provenance."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def thin_history(history: Mapping[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    """Compact history for ``model.meta`` (curves thinned; a checkpoint's history.json keeps
    everything)."""
    n = len(history["steps"])
    stride = max(1, math.ceil(n / META_HISTORY_POINTS))
    keep = list(range(0, n, stride))
    if n and keep[-1] != n - 1:
        keep.append(n - 1)
    thin = {k: [round(float(history[k][i]), 6) for i in keep] for k in CURVES}
    out = {
        "status": history["status"],
        "step": history["step"],
        **thin,
        "warnings": list(history["warnings"]),
        "events": history["events"][-50:],
    }
    for key in extra:
        out[key] = history[key][-50:]
    return out


class TrainingLoop:
    """Base class: owns the optimizer, the schedule, the history and the checkpoints.

    Attributes set by subclasses before :meth:`_init_optimizer`: ``self.model``.
    """

    #: per-step lists of the history (restored on resume); subclasses extend it
    curve_keys: tuple[str, ...] = CURVES
    #: files of the model folder written by ``model.save``
    weights_file = "model.safetensors"

    def __init__(
        self,
        config: Any,
        progress: StepProgress | None,
        cancel: CancelToken | None,
        out: str | os.PathLike[str] | None,
        provenance: Mapping[str, Any] | None,
    ) -> None:
        from napari_muvit import __version__

        self.config = config
        self.progress = progress
        self.cancel = cancel or CancelToken()
        self.out = None if out is None else Path(out)
        self.device = resolve_device(config.device)
        self.amp_dtype = resolve_amp(config.amp, self.device)
        self.step = 0
        self._good_step = 0  # step of the last checkpoint on disk
        self._elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        self._last_ckpt_time = time.monotonic()
        self._step_lock = threading.Lock()  # held during each optimisation step
        self._holds_lock = False  # whether run() holds the output folder's advisory lock
        # with a tuner (see tune_threads) each step's torch thread count is chosen by speed
        self.thread_tuner: ThreadTuner | None = None
        self._thread_budget: Callable[[], int] | None = None
        self._run_threads: int | None = None  # the calling thread's count while run() runs
        prov = {"napari_muvit": __version__, "started": now(), **dict(provenance or {})}
        self.history: dict[str, Any] = {
            "status": "created",
            "step": 0,
            **{k: [] for k in self.curve_keys},
            "events": [],
            "warnings": [],
            "provenance": prov,
            "config": config.to_dict(),
        }

    # ------------------------------------------------------------------ history
    def _event(self, kind: str, message: str, warning: bool = False) -> None:
        """Record a message (and a warning) in the history at the current step."""
        self.history["events"].append({"step": self.step, "kind": kind, "message": message})
        if warning:
            self.history["warnings"].append(message)

    # ------------------------------------------------------------------ optimisation
    def _init_optimizer(self, groups: list[dict[str, Any]]) -> None:
        """AdamW over ``groups``, warm-up + cosine schedule, grad scaler for float16 AMP."""
        cfg = self.config
        self.optimizer = torch.optim.AdamW(
            groups, lr=groups[0]["lr"], weight_decay=cfg.weight_decay
        )
        warmup = default_warmup(cfg.steps, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.steps, warmup, cfg.min_lr_factor)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )

    def _optimize(self, loss: Tensor) -> float:
        """Backward, clip, step; raises :class:`TrainingDivergedError` on NaN/inf *before*
        touching the weights, so the model stays at its last good state."""
        if not torch.isfinite(loss):
            raise self._diverged(f"the loss is {float(loss.detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip or float("inf"))
        # with float16 AMP, inf gradients are expected now and then: the scaler skips the step
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            raise self._diverged(f"the gradient norm is {float(norm)}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(norm)

    def _diverged(self, what: str) -> TrainingDivergedError:
        with torch.no_grad():
            for buf, saved in zip(self.model.buffers(), getattr(self, "_buffers", [])):
                buf.copy_(saved)
        where = (
            f"; the last good checkpoint (step {self._good_step}) in {self.out} was kept"
            if self.out is not None and self._good_step
            else ""
        )
        msg = (
            f"training diverged at step {self.step + 1}: {what}{where}. "
            "The model was left at its last good weights; try a lower learning rate (--lr)"
        )
        self.history["status"] = "diverged"
        self._event("diverged", msg, warning=True)
        return TrainingDivergedError(msg)

    def tune_threads(self, budget: Callable[[], int] | int | None = None) -> None:
        """Choose each step's torch thread count on the CPU by measured speed, at most
        ``budget`` (a count, a callable re-read every step, or ``None``: the calling thread's
        count when :meth:`run` starts). See :class:`~napari_muvit.engine.threads.ThreadTuner`."""
        if self.device.type != "cpu":
            return
        self.thread_tuner = ThreadTuner()
        if callable(budget) or budget is None:
            self._thread_budget = budget
        else:
            fixed = max(1, int(budget))
            self._thread_budget = lambda: fixed

    @property
    def run_threads(self) -> int | None:
        """The thread budget of the run (what work between steps, e.g. validation, uses):
        ``None`` outside :meth:`run` (the calling thread's count)."""
        if self._run_threads is None:
            return None
        return self._thread_budget() if self._thread_budget else self._run_threads

    def _tuned_threads(self) -> int | None:
        if self.thread_tuner is None or self._run_threads is None:
            return None
        return self.thread_tuner.apply(self.run_threads)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Train until ``config.steps`` (or cancellation); returns the history dict.

        ``history["status"]`` is ``"finished"`` or ``"cancelled"`` (both checkpointed); a
        diverging run raises :class:`TrainingDivergedError` (status ``"diverged"``).
        """
        with self._folder_lock():
            self._holds_lock = self.out is not None
            try:
                return self._run()
            finally:
                self._holds_lock = False

    def _run(self) -> dict[str, Any]:
        steps = self.config.steps
        self.history["status"] = "running"
        start = time.monotonic()
        self._last_ckpt_time = start
        threads_before = self._run_threads = torch.get_num_threads()
        try:
            self._steps(steps, start)
        finally:
            self._run_threads = None
            if torch.get_num_threads() != threads_before:
                torch.set_num_threads(threads_before)
        self._elapsed_before += time.monotonic() - start
        self._after_run()
        self.checkpoint()
        self._report(final=True)
        return self.history

    def _steps(self, steps: int, start: float) -> None:
        while self.step < steps:
            if self.cancel.cancelled:
                self.history["status"] = "cancelled"
                self._event("cancelled", f"cancelled by the user at step {self.step}")
                break
            self._before_step()
            # BatchNorm statistics change in the forward pass, before the NaN guard can act:
            # keep them so a diverged step can be undone completely
            batch = self._batch(self.step)
            tuned = self._tuned_threads()
            with self._step_lock:
                self._buffers = [b.detach().clone() for b in self.model.buffers()]
                t_step = time.perf_counter()
                stats = self.train_step(batch)
                if tuned is not None:
                    self.thread_tuner.record(tuned, time.perf_counter() - t_step, 1)
                self.step += 1
            self._record(stats, self._elapsed_before + time.monotonic() - start)
            if self._checkpoint_due():
                self.checkpoint()
        else:
            self.history["status"] = "finished"

    def _record(self, stats: Mapping[str, float], elapsed: float) -> None:
        h = self.history
        h["step"] = self.step
        h["steps"].append(self.step)
        h["lr"].append(self.optimizer.param_groups[0]["lr"])
        h["elapsed"].append(round(elapsed, 3))
        for key in self.curve_keys:
            if key not in CURVES:
                h[key].append(float(stats.get(key, 0.0)))
        h["loss"].append(float(stats["loss"]))
        self._after_record()
        self._report()

    def _report(self, final: bool = False) -> None:
        if self.progress is None:
            return
        h = self.history
        info = {
            "step": self.step,
            "steps": self.config.steps,
            "loss": h["loss"][-1] if h["loss"] else float("nan"),
            "lr": h["lr"][-1] if h["lr"] else self.optimizer.param_groups[0]["lr"],
            "elapsed": h["elapsed"][-1] if h["elapsed"] else 0.0,
            "status": h["status"] if final else "running",
        }
        info.update(self._report_extra())
        self.progress(info)

    def _checkpoint_due(self) -> bool:
        cfg = self.config
        if self.out is None or self.step >= cfg.steps:
            return False  # the final checkpoint is written by run()
        if cfg.checkpoint_unit == "steps":
            return self.step % max(1, int(cfg.checkpoint_every)) == 0
        return time.monotonic() - self._last_ckpt_time >= cfg.checkpoint_every

    def snapshot(self) -> nn.Module:
        """A copy of the model between two steps, in eval mode, with its ``meta`` (crop size,
        config, history) up to date: safe to call from another thread while :meth:`run`
        trains, e.g. for a live preview."""
        import copy

        with self._step_lock:
            self._update_meta()  # crop size, config, history: predictable like a checkpoint
            model = copy.deepcopy(self.model)
        return model.eval()

    # ------------------------------------------------------------------ hooks
    def _before_step(self) -> None:
        """Called before every step (e.g. to apply label updates)."""

    def _after_record(self) -> None:
        """Called after a step was recorded (e.g. validation)."""

    def _after_run(self) -> None:
        """Called once after the loop, before the final checkpoint."""

    def _report_extra(self) -> dict[str, Any]:
        """Extra entries of the progress dict."""
        return {}

    def _batch(self, step: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_meta(self) -> None:
        """Store config/history in ``self.model.meta`` before saving."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved."""

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path | None:
        """Write model + training state to ``out`` atomically (no-op without ``out``).

        Safe to call from another thread while :meth:`run` trains (it waits for the step).
        """
        with self._step_lock:
            return self._write_checkpoint()

    def _write_checkpoint(self) -> Path | None:
        self._update_meta()
        if self.out is None:
            return None
        state = self._train_state()
        with self._folder_lock():
            ckpt.write_checkpoint(self.out, self.model, state, self.history)
        self._good_step = self.step
        self._last_ckpt_time = time.monotonic()
        return self.out

    def _folder_lock(self) -> Any:
        """The run folder's lock: already held while :meth:`run` trains (possibly in another
        thread than a :meth:`checkpoint` call), else taken for the duration of the block."""
        if self._holds_lock or self.out is None:
            return contextlib.nullcontext()
        return ckpt.run_folder_lock(self.out)

    def _train_state(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "step": self.step,
            "elapsed": self._elapsed_before,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
            **self._extra_state(),
        }

    def _restore(self) -> None:
        """Load weights, optimizer, scheduler, step and history from ``out``."""
        if self.out is None:
            raise InputError("resume: needs an output folder (out) holding a training run")
        from safetensors.torch import load_file

        with self._folder_lock():
            ckpt.recover_folder(self.out)
            state = ckpt.load_train_state(self.out)
            weights = load_file(str(self.out / self.weights_file), device="cpu")
            old_history = ckpt.load_history(self.out) or {}
        self._load_extra_state(state)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = self._good_step = int(state["step"])
        self._elapsed_before = float(state.get("elapsed", 0.0))
        self._restore_history(old_history)
        self._event("resumed", f"resumed from {self.out.name} at step {self.step}")

    def _restore_history(self, old: Mapping[str, Any]) -> None:
        for key in self.curve_keys:
            self.history[key] = list(old.get(key, []))[: self.step]
        if "val" in self.history:
            self.history["val"] = [v for v in old.get("val", []) if v["step"] <= self.step]
        for key in ("events", "warnings"):
            self.history[key] = old.get(key, []) + self.history[key]
        self.history["step"] = self.step
        self.history["provenance"] = {**old.get("provenance", {}), "resumed": now()}


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of a module's state dict (for ``train_state.pt``)."""
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
