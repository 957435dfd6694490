"""ONE training loop for teachers, baselines and distilled students; the objective is what differs.

An objective maps (logits, labels, augmented uint8 images) to a loss and its named parts. Plain training
uses `cross_entropy_objective`; distillation passes an objective that also asks a frozen teacher (which
prepares the same images its own way).

The loop is deterministic given the recipe's seed: the batch order of an epoch and the augmentation of a
step are pure functions of (seed, epoch) and (seed, step), and the torch RNG state travels in the
checkpoint, so a run resumed from any checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from kdforge.data import DataSplits, ImageDataset, epoch_order, eval_batches
from kdforge.data.transforms import InputSpec, apply_augment, draw_augment
from kdforge.errors import DataError, KdforgeError
from kdforge.recipe import AugmentConfig, TrainConfig
from kdforge.runtime import Runtime, out_of_memory_as_error
from kdforge.train.checkpoint import load_state, load_weights, save_checkpoint
from kdforge.train.events import Consumer

if TYPE_CHECKING:
    from kdforge.distill.cache import TeacherCache


class Objective(Protocol):
    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
        teacher_logits: torch.Tensor | None = None, epoch: int = 1,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...  # epoch counts from 1 (DKD's warm-up reads it)


def cross_entropy_objective(label_smoothing: float = 0.0) -> Objective:
    def objective(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, teacher_logits=None, epoch=1):
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        return loss, {"ce": loss}

    return objective


# ----------------------------------------------------------------------------------------------------------
# evaluation: logits first, metrics derive from them


def predict_logits(
    model: torch.nn.Module,
    spec: InputSpec,
    dataset: ImageDataset,
    batch_size: int,
    runtime: Runtime,
    limit_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels of the dataset, in order, with the model in eval mode."""
    return _predict(model, spec, dataset, eval_batches(len(dataset), batch_size)[:limit_batches], runtime)


@torch.inference_mode()
def _predict(model, spec: InputSpec, dataset: ImageDataset, batches: list[torch.Tensor], runtime: Runtime):
    """Every forward that is not training runs here, under inference mode: no autograd graph is kept, so memory
    does not grow with the number of evaluation batches (with autograd on, each batch's graph stayed alive
    through its logits and a ViT-B at 224 filled an 80 GB GPU in its first evaluation)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for idx in batches:
        idx = idx.to(dataset.images.device)
        with runtime.autocast():
            out = model(runtime.format_input(model, spec.prepare(dataset.images[idx])))
        logits.append(out.float().cpu())
        labels.append(dataset.labels[idx].cpu())
    model.train(was_training)
    if not logits:  # more processes than evaluation batches
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def evaluate(model, spec, dataset, batch_size, runtime, limit_batches=None) -> dict[str, float]:
    """Test top-1/top-5/loss. Across processes each evaluates its share of the batches and the sums are
    reduced, so every process gets the metrics of the whole split."""
    batches = eval_batches(len(dataset), batch_size)[:limit_batches]
    logits, labels = _predict(model, spec, dataset, batches[runtime.rank::runtime.world_size], runtime)
    if len(labels):
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        sums = [top[:, :1].any(1).sum().item(), top.any(1).sum().item(),
                F.cross_entropy(logits, labels, reduction="sum").item(), len(labels)]
    else:
        sums = [0.0, 0.0, 0.0, 0]
    top1, top5, loss, count = runtime.all_reduce_sum(sums)
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "count": int(count)}


# ----------------------------------------------------------------------------------------------------------
# schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_factor: float) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then cosine decay to `min_factor` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Plan:
    """How long a run is, derived once from the data size and the recipe's limits."""

    steps_per_epoch: int
    total_steps: int
    epochs: int

    @classmethod
    def create(cls, num_train: int, cfg: TrainConfig) -> Plan:
        full = num_train // cfg.batch_size
        if full == 0:
            raise DataError(
                f"the training split has {num_train} images, fewer than one batch of {cfg.batch_size}; "
                f"lower train.batch_size"
            )
        per_epoch = min(full, cfg.limit_batches or full)
        total = per_epoch * cfg.epochs
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        return cls(steps_per_epoch=per_epoch, total_steps=total, epochs=math.ceil(total / per_epoch))


# ----------------------------------------------------------------------------------------------------------
# the loop

TRAIN_ADVICE = ("lower the batch size ([train] or [teacher.train] / [student.train] batch_size), train in mixed "
                "precision on a GPU (runtime.precision = \"bf16\" or \"fp16\") or use a smaller input_size")
EVAL_ADVICE = ("evaluation runs at the training batch size: lower it, or evaluate fewer batches "
               "(train.limit_eval_batches)")
KEPT = "; checkpoints written before this are kept (run the same command with --resume to continue from them)"


@dataclass
class FitResult:
    steps: int
    final: dict[str, float]  # test-split evaluation after the last step
    best: dict[str, float]  # the best epoch-end evaluation (by top-1; on the validation split when there is one)
    train_images_per_s: float = 0.0  # training throughput (forward, backward, update), evaluation excluded


def fit(
    model: torch.nn.Module,
    spec: InputSpec,
    objective: Objective,
    data: DataSplits,
    cfg: TrainConfig,
    augment: AugmentConfig,
    runtime: Runtime,
    seed: int,
    stage_dir: Path,
    title: str,
    resume_from: Path | None = None,
    consumers: Sequence[Consumer] = (),
    checkpoint_metadata: dict[str, str] | None = None,
    teacher_cache: TeacherCache | None = None,
) -> FitResult:
    """Train `model` in place; checkpoints go to `stage_dir`; events go to `consumers`.

    With a `teacher_cache`, augmented views and the teacher's logits come from it (the objective receives them
    as `teacher_logits`). Across several processes (torchrun), each takes its share of every global batch of
    `cfg.batch_size` (the same images and augmentation a single process would use), gradients are averaged by
    DistributedDataParallel, metrics are reduced, and only the main process checkpoints."""
    import timm.optim

    plan = Plan.create(len(data.train), cfg)
    if cfg.batch_size % runtime.world_size:
        raise DataError(f"train.batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                        f"{runtime.world_size} processes")
    runtime.place(model).train()
    forward = runtime.for_training(model)
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    warmup = round(cfg.warmup_epochs * plan.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, plan.total_steps, warmup, cfg.scheduler, cfg.min_lr / cfg.lr),
    )
    scaler = runtime.grad_scaler()
    step, best = 0, {"top1": -1.0}
    if resume_from is not None:
        load_weights(model, resume_from)
        state = load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if runtime.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        step, best = state["step"], state["best"]

    def emit(event: dict[str, Any]) -> None:
        for consume in consumers:
            consume(event)

    def checkpoint(is_best: bool) -> None:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if runtime.device.type == "cuda" else [],
            "step": step,
            "best": best,
        }
        meta = {**(checkpoint_metadata or {}), "step": str(step), "top1": str(best.get("top1"))}
        if runtime.is_main:
            save_checkpoint(stage_dir, step, model, state, meta, best=is_best)

    def out_of_memory(phase: str, advice: str):
        return out_of_memory_as_error(
            f"in {title} on {runtime.device} while {phase} at batch size {cfg.batch_size} "
            f"({spec.size}x{spec.size}, {runtime.precision})", advice + KEPT)

    train_set = data.train.to(runtime.device)
    test_set = data.test.to(runtime.device)
    # each epoch is evaluated on the split that chooses the best checkpoint: validation when the data has one
    # (the test split is then evaluated once, at the end, for the reported numbers), else the test split
    watch_set, watch_split = (data.val.to(runtime.device), "val") if data.val is not None else (test_set, "test")
    emit({"event": "start", "title": title, "step": step, "total_steps": plan.total_steps,
          "steps_per_epoch": plan.steps_per_epoch, "device": runtime.describe()})

    def new_window() -> dict[str, Any]:
        """Loss and accuracy since the last log line, summed on the device: a step never waits for the device to
        report a number (on a GPU, `.item()` in every step stalls the queue of kernels); they are read, and the
        loss checked for NaN/inf, when a line is logged or a checkpoint written."""
        return {"loss": torch.zeros((), dtype=torch.float64, device=runtime.device),
                "correct": torch.zeros((), dtype=torch.int64, device=runtime.device), "seen": 0,
                "first": step + 1, "time": time.perf_counter()}

    def check_finite(window: dict[str, Any]) -> float:
        """The window's summed loss; an error when it is not finite (before anything is logged or saved)."""
        loss_sum = window["loss"].item()
        if not math.isfinite(loss_sum):
            raise KdforgeError(f"{title}: loss became {loss_sum} between steps {window['first']} and {step}; "
                               f"lower train.lr or set train.grad_clip")
        return loss_sum

    final: dict[str, float] = {}
    window = new_window()
    images_seen, train_time = 0, 0.0
    order_epoch, order = -1, []
    try:
        while step < plan.total_steps:
            epoch, index = divmod(step, plan.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(len(train_set), cfg.batch_size, seed, epoch)
            batch_idx = order[index]
            started = time.perf_counter()

            mine = slice(runtime.rank, None, runtime.world_size)  # this process's share of the global batch
            idx = batch_idx[mine].to(runtime.device)
            if teacher_cache is not None:
                images, teacher_logits = teacher_cache.batch(train_set.images, idx, epoch)
            else:  # drawn for the global batch, so every process count sees the same augmentation
                generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
                offsets, flips = draw_augment(len(batch_idx), augment.crop_padding, augment.hflip, generator)
                images = apply_augment(train_set.images[idx], augment.crop_padding,
                                       offsets[:, mine] if offsets is not None else None,
                                       flips[mine] if flips is not None else None)
                teacher_logits = None
            with out_of_memory("training", TRAIN_ADVICE):
                labels = train_set.labels[idx]
                with runtime.autocast():
                    logits = forward(runtime.format_input(model, spec.prepare(images)))
                    loss, parts = objective(logits, labels, images, teacher_logits, epoch=epoch + 1)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            step += 1

            window["loss"] += loss.detach().double() * len(labels)  # as float64 as a Python float would be
            window["correct"] += (logits.argmax(1) == labels).sum()
            window["seen"] += len(labels)
            images_seen += len(labels)
            train_time += time.perf_counter() - started
            emit({"event": "step", "step": step})

            end_of_epoch = step % plan.steps_per_epoch == 0 or step == plan.total_steps
            saving = end_of_epoch or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if step % cfg.log_every == 0 or step == plan.total_steps:
                elapsed = time.perf_counter() - window["time"]
                loss_sum, correct, seen = runtime.all_reduce_sum(
                    [check_finite(window), window["correct"].item(), window["seen"]])
                emit({
                    "event": "log", "step": step, "total_steps": plan.total_steps, "epoch": epoch,
                    "loss": loss_sum / seen, "train_top1": correct / seen,
                    "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / max(elapsed, 1e-9),
                    **{f"loss_{name}": value.item() for name, value in parts.items()},
                })
                window = new_window()
            elif saving:
                check_finite(window)  # never save weights a NaN loss has reached

            if end_of_epoch:
                with out_of_memory("evaluating", EVAL_ADVICE):
                    final = evaluate(model, spec, watch_set, cfg.batch_size, runtime, cfg.limit_eval_batches)
                is_best = final["top1"] > best["top1"]
                if is_best:
                    best = {**final, "step": step, "epoch": epoch + 1}
                emit({"event": "eval", "split": watch_split, "step": step, "epoch": epoch + 1, **final})
                checkpoint(is_best)
            elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(False)

        if not final or watch_split != "test":  # the reported numbers: the final weights on the test split
            with out_of_memory("evaluating", EVAL_ADVICE):
                final = evaluate(model, spec, test_set, cfg.batch_size, runtime, cfg.limit_eval_batches)
            if watch_split != "test":
                emit({"event": "eval", "split": "test", "step": step, "epoch": plan.epochs, **final})
    finally:
        emit({"event": "end", "step": step})

    return FitResult(
        steps=step, final=final, best=best,
        train_images_per_s=images_seen * runtime.world_size / train_time if train_time else 0.0,
    )

