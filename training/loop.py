"""One training loop for every model in the pipeline (VAE, DiT teacher, velocity models, students).

Read top to bottom: build the optimiser and EMA, restore a checkpoint if there is one, then
`for step`: draw the batch, compute the loss, step, update the EMA, log, checkpoint.

All randomness is a function of (seed, step, rank): the data order is a per-epoch permutation and the
loss's noise comes from a generator seeded per step. Resuming therefore needs only the step counter
plus the model, EMA and optimiser states, and a resumed run is bitwise identical to an uninterrupted
one on CPU. `accelerate` carries device placement, mixed precision and multi-process data parallelism.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from reflow.seeds import mix_seed
from training.loader import Batch, BatchSource, InMemorySource

LossFn = Callable[[nn.Module, Batch, torch.Generator, int], torch.Tensor]  # (model, batch, generator, step)
LogFn = Callable[[dict[str, float], int], None]
CrashPoint = Callable[[str], None]  # called with a point's name where a kill hurts most (storage.faults)


class ResumeStore(Protocol):
    """Where training state is checkpointed between runs (storage.checkpoints provides one on disk)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last checkpoint written before it is still valid."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int  # per process
    lr: float
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    log_every: int = 25
    checkpoint_every: int = 200
    seed: int = 0


@dataclass
class TrainResult:
    model: nn.Module  # the raw weights after the last step
    ema: nn.Module  # the EMA weights (what gets saved and sampled from)
    last_loss: float
    images_per_s: float
    resumed_from: int


def enable_tf32() -> None:
    """TF32 for the fp32 matmuls and convolutions left on CUDA (training and generation alike)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def make_accelerator(device: str, mixed_precision: str) -> Accelerator:
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is visible")
    if not cpu:
        enable_tf32()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def no_crash_point(name: str) -> None:
    """The default crash hook: nothing happens at any point."""


def _prepare(
    model: nn.Module, cfg: TrainConfig, accelerator: Accelerator, resume: ResumeStore | None
) -> tuple[nn.Module, torch.optim.Optimizer, EMAModel, int]:
    """The optimiser and EMA for `model`, restored from `resume`'s checkpoint if there is one, with the model
    and optimiser handed to accelerate; and the step to start from."""
    device = accelerator.device
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    model.to(device)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=True)
    start = 0
    state = resume.load() if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start = int(state["step"])
    ema.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, ema, start


def _loss(
    model: nn.Module, loss_fn: LossFn, batch: Batch, step: int, rank: int, cfg: TrainConfig,
    accelerator: Accelerator, desc: str,
) -> torch.Tensor:
    """The loss of one step, its noise from a generator seeded by (seed, step, rank); a non-finite loss stops
    training before it reaches the weights."""
    generator = torch.Generator(device=accelerator.device).manual_seed(mix_seed(cfg.seed, step, rank, 1))
    with accelerator.autocast():
        loss = loss_fn(model, batch, generator, step)
    if not torch.isfinite(loss.detach()).item():
        raise NonFiniteLossError(
            f"{desc}: loss is {loss.item()} at step {step}; stopped. The last checkpoint "
            f"(step {(step // cfg.checkpoint_every) * cfg.checkpoint_every}) is intact: lower the "
            "learning rate or enable grad_clip and rerun to resume from it."
        )
    return loss


def sync_gradients(parameters, accelerator: Accelerator) -> None:
    """Average the gradients over the processes, as DDP would have: for an objective that runs the raw module
    (MeanFlow's `torch.func.jvp` cannot run through the DDP wrapper, so DDP's gradient hooks never fire)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _update(
    model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, ema: EMAModel,
    accelerator: Accelerator, grad_clip: float | None, manual_sync: bool = False,
) -> None:
    """Backward (and, for an objective past DDP, the gradients averaged by hand), clip, optimiser step, then the
    EMA from the new weights."""
    accelerator.backward(loss)
    if manual_sync:
        sync_gradients(model.parameters(), accelerator)
    if grad_clip is not None:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.step(accelerator.unwrap_model(model).parameters())


class _LogWindow:
    """The steps since the last log line. Losses are summed on the device, so that reading them (a host sync)
    happens once per log line, not once per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss, self.steps, self.t0 = torch.zeros((), device=device), 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.steps += 1

    def summary(self, accelerator: Accelerator, global_batch: int) -> tuple[float, float]:
        """(mean loss over the window and every process, images/s of the window)."""
        mean_loss = accelerator.reduce(self.loss, "mean").item() / self.steps
        elapsed = time.perf_counter() - self.t0
        return mean_loss, self.steps * global_batch / max(elapsed, 1e-9)

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.t0 = 0, time.perf_counter()


def _save_checkpoint(
    resume: ResumeStore | None, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
    ema: EMAModel, step: int,
) -> None:
    if resume is not None and accelerator.is_main_process:
        resume.save({
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "step": step,
        })
    accelerator.wait_for_everyone()


def _result(
    accelerator: Accelerator, model: nn.Module, ema: EMAModel, last_loss: float, images_per_s: float, start: int
) -> TrainResult:
    """The raw model and a copy holding the EMA weights, both in eval mode."""
    raw = accelerator.unwrap_model(model)
    ema_model = copy.deepcopy(raw)
    ema.copy_to(ema_model.parameters())
    raw.eval()
    ema_model.eval()
    return TrainResult(raw, ema_model, last_loss, images_per_s, start)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batch | BatchSource,
    cfg: TrainConfig,
    accelerator: Accelerator,
    *,
    resume: ResumeStore | None = None,
    log: LogFn | None = None,
    desc: str = "train",
    crash_point: CrashPoint = no_crash_point,
) -> TrainResult:
    """Train `model` for `cfg.steps` steps on `data`: tensors in RAM (rows on the first axis), or a
    `training.loader` source (`ChunkedSource` for datasets larger than the RAM budget). `crash_point` is called
    with "train_step" after every optimiser and EMA step: the stages pass `storage.faults.crash_point`, where
    the reliability tests kill the process."""
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    source = (InMemorySource(data, cfg.seed) if isinstance(data, dict) else data).to(device)
    model, optimizer, ema, start = _prepare(model, cfg, accelerator, resume)
    manual_sync = getattr(loss_fn, "manual_gradient_sync", False)  # the objective bypasses DDP (reflow/meanflow.py)

    global_batch = cfg.batch_size * world
    window = _LogWindow(device)
    last_loss, images_per_s = float("nan"), 0.0

    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", mininterval=1.0,
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        batch = source.batch(step, global_batch, rank, cfg.batch_size)
        loss = _loss(model, loss_fn, batch, step, rank, cfg, accelerator, desc)
        _update(model, loss, optimizer, ema, accelerator, cfg.grad_clip, manual_sync)
        crash_point("train_step")
        window.add(loss)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            last_loss, images_per_s = window.summary(accelerator, global_batch)
            if log is not None and accelerator.is_main_process:
                log({"loss": last_loss, "images_per_s": images_per_s, "lr": cfg.lr}, done)
            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_s:.0f}")
            window.reset()
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_checkpoint(resume, accelerator, model, optimizer, ema, done)
        bar.update(1)
    bar.close()
    if start < cfg.steps:
        _save_checkpoint(resume, accelerator, model, optimizer, ema, cfg.steps)
    return _result(accelerator, model, ema, last_loss, images_per_s, start)
