"""ONE training loop for teachers, baselines and distilled students; the objective is what differs.

    result = fit(model, spec, objective, data, recipe.student.train, runtime,
                 BatchSource(recipe.data.augment, recipe.seed), stage_dir, title="student resnet18")

An objective (distill/objective.py) maps (logits, labels, augmented uint8 images) to a loss and its named
parts. A batch source says which images a step trains on and how they are augmented: online augmentation, or
the teacher cache's stored views with the teacher's answers. The train state (optimizer, scheduler, gradient
scaler, RNG, step, best) is what a checkpoint saves and a resume restores.

The loop is deterministic given the recipe's seed: the batch order of an epoch and the augmentation of a
step are pure functions of (seed, epoch) and (seed, step) (kdforge/rng.py), and the torch RNG state travels in
the checkpoint, so a run resumed from any checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kdforge.checkpoint import load_state, load_weights, save_checkpoint
from kdforge.data import DataSplits, ImageDataset, epoch_order, eval_batches
from kdforge.data.crops import finish_views
from kdforge.data.loader import prefetch, read_batches
from kdforge.data.transforms import InputSpec, apply_augment, draw_augment, mix_batch
from kdforge.distill.cache import view_choice
from kdforge.distill.objective import Objective, hard_labels, prediction
from kdforge.errors import DataError, KdforgeError
from kdforge.metrics import topk_hits
from kdforge.phases import Consumer
from kdforge.recipe import AugmentConfig, TrainConfig, check_processes
from kdforge.rng import rng_stream, stream_seed
from kdforge.runtime import Runtime, out_of_memory_as_error

if TYPE_CHECKING:
    from kdforge.distill.cache import TeacherCache


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
    for idx, images in zip(batches, read_batches(dataset.images, batches), strict=True):
        with runtime.autocast():
            out = model(runtime.format_input(model, spec.prepare(images.to(runtime.device, non_blocking=True))))
        logits.append(out.float().cpu())
        labels.append(dataset.labels[idx.to(dataset.labels.device)].cpu())
    model.train(was_training)
    if not logits:  # more processes than evaluation batches
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model, spec, dataset, batch_size, runtime, limit_batches=None) -> dict[str, float]:
    """Test top-1/top-5/loss. Across processes each evaluates its share of the batches and the sums are
    reduced, so every process gets the metrics of the whole split."""
    batches = eval_batches(len(dataset), batch_size)[:limit_batches]
    logits, labels = _predict(model, spec, dataset, batches[runtime.rank::runtime.world_size], runtime)
    if len(labels):
        hits = topk_hits(logits, labels, (1, 5))
        sums = [hits[1].sum().item(), hits[5].sum().item(),
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
# batches, state, the running window of a log line

TRAIN_ADVICE = ("lower the batch size ([train] or [teacher.train] / [student.train] batch_size), train in mixed "
                "precision on a GPU (runtime.precision = \"bf16\" or \"fp16\") or use a smaller input_size")
EVAL_ADVICE = ("evaluation runs at the training batch size: lower it, or evaluate fewer batches "
               "(train.limit_eval_batches)")
KEPT = "; checkpoints written before this are kept (run the same command with --resume to continue from them)"


class BatchSource:
    """Which training images each step sees, and how: the batches of an epoch are a shuffled order drawn from
    (seed, epoch); a batch held in memory is augmented online from (seed, step), or, with a `teacher_cache`,
    read as its stored views together with the teacher's logits for them. Streamed data is decoded ahead by
    the data's workers, each image's view a pure function of (seed, epoch, image). `waited` counts the seconds
    a step waited for its images (the data path's share of step time)."""

    def __init__(self, augment: AugmentConfig, seed: int, teacher_cache: TeacherCache | None = None) -> None:
        self.augment, self.seed, self.teacher_cache = augment, seed, teacher_cache
        self._epoch, self._order = -1, []
        self._stream, self._next = None, (-1, -1)  # streamed views being decoded ahead, and which batch is next
        self.waited = 0.0

    def batch_indices(self, num_images: int, batch_size: int, epoch: int, index: int) -> torch.Tensor:
        """The global batch number `index` of `epoch` (indices into the training split)."""
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(num_images, batch_size, self.seed, epoch)
        return self._order[index]

    def images(self, train: ImageDataset, batch_idx: torch.Tensor, mine: slice, idx: torch.Tensor, step: int,
               epoch: int, index: int = 0, batches_left: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(augmented uint8 images, the teacher's logits or None) of this process's share `mine` (indices `idx`
        on the device) of the global batch `batch_idx`, batch `index` of `epoch`; `batches_left` of the epoch's
        batches (this one included) will be trained, which bounds what a stream decodes ahead."""
        if train.streamed:
            images = self.streamed(train, mine, epoch, index, batches_left, idx.device).to(idx.device,
                                                                                          non_blocking=True)
            cache = self.teacher_cache
            return images, cache.logits(cache.choice(idx, epoch), idx) if cache is not None else None
        if self.teacher_cache is not None:
            return self.teacher_cache.batch(train.images, idx, epoch)
        # drawn for the global batch, so every process count sees the same augmentation
        offsets, flips = draw_augment(len(batch_idx), self.augment.crop_padding, self.augment.hflip,
                                      rng_stream(self.seed, "augment", step))
        images = apply_augment(train.images[idx].to(idx.device), self.augment.crop_padding,
                               offsets[:, mine] if offsets is not None else None,
                               flips[mine] if flips is not None else None)
        return images, None

    def streamed(self, train: ImageDataset, mine: slice, epoch: int, index: int, batches_left: int,
                 device: torch.device) -> torch.Tensor:
        started = time.perf_counter()
        on_device = getattr(train.images, "decode", "cpu") == "gpu"  # the workers plan, this process decodes
        if self._next != (epoch, index):  # a new epoch, or the first step after a resume
            order = [batch[mine] for batch in self._order[index:index + batches_left]]
            views, cache = train.images.plans if on_device else train.images.views, self.teacher_cache
            if cache is None:
                def load(idx: torch.Tensor) -> torch.Tensor:
                    return views(idx, self.seed, epoch)
            else:  # the teacher cache's view of each image, the one its stored answer is for
                choice = view_choice(cache.num_images, cache.views, self.seed, epoch)

                def load(idx: torch.Tensor) -> torch.Tensor:
                    return views(idx, self.seed, choice[idx], "cache_image_view")
            self._stream = prefetch(load, order, train.images.workers)
        images = next(self._stream)
        if on_device:
            images = finish_views(images, train.images.size, device)
        self._next = (epoch, index + 1)
        self.waited += time.perf_counter() - started
        return images

    def close(self) -> None:
        """End the decoding workers of a stream stopped before its last batch (a failed or interrupted run)."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._next = None, (-1, -1)

    def mix(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, step: int):
        """Mixup / CutMix of this step's batch (`[data.augment]`), as targets (N, C); unchanged when off."""
        if not self.augment.mixes:
            return images, labels
        return mix_batch(images, labels, self.augment, num_classes, stream_seed(self.seed, "mixup", step))


@dataclass
class TrainState:
    """Everything a checkpoint saves besides the weights, and what one optimizer step changes."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any  # torch.amp.GradScaler (disabled outside fp16)
    step: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"top1": -1.0})

    extra: torch.nn.Module | None = None  # trained beside the model, not part of it (distill/features.py)

    @classmethod
    def create(cls, model: torch.nn.Module, cfg: TrainConfig, plan: Plan, runtime: Runtime,
               extra: torch.nn.Module | None = None) -> TrainState:
        import timm.optim

        optimizer = timm.optim.create_optimizer_v2(
            model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
        own = [p for p in model.parameters() if getattr(p, "own_lr", None)]
        if own:  # parameters that train at a learning rate of their own, without weight decay (QAD's ranges)
            mine = {id(p) for p in own}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in mine]
            for lr in sorted({p.own_lr for p in own}):
                optimizer.add_param_group({"params": [p for p in own if p.own_lr == lr], "lr": lr,
                                           "weight_decay": 0.0})
        if extra is not None:  # the same optimizer and schedule
            optimizer.add_param_group({"params": list(extra.parameters())})
        warmup = round(cfg.warmup_epochs * plan.steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, plan.total_steps, warmup, cfg.scheduler, cfg.min_lr / cfg.lr),
        )
        return cls(optimizer, scheduler, runtime.grad_scaler(), extra=extra)

    def restore(self, model: torch.nn.Module, checkpoint: Path, runtime: Runtime) -> None:
        load_weights(model, checkpoint)
        state = load_state(checkpoint)
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if runtime.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.best = state["step"], state["best"]

    def save(self, stage_dir: Path, model: torch.nn.Module, runtime: Runtime, metadata: dict[str, str],
             is_best: bool) -> None:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if runtime.device.type == "cuda" else [],
            "step": self.step,
            "best": self.best,
            **({"extra": self.extra.state_dict()} if self.extra is not None else {}),
        }
        meta = {**metadata, "step": str(self.step), "top1": str(self.best.get("top1"))}
        if runtime.is_main:
            save_checkpoint(stage_dir, self.step, model, state, meta, best=is_best)

    def update(self, loss: torch.Tensor, model: torch.nn.Module, grad_clip: float | None) -> None:
        """One optimizer step on `loss` (scaled for fp16, gradients clipped when asked), then the lr schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.extra is not None and torch.distributed.is_initialized():  # DDP averages the model's gradients only
            for parameter in self.extra.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= torch.distributed.get_world_size()
        if grad_clip:
            self.scaler.unscale_(self.optimizer)
            parameters = [*model.parameters(), *(self.extra.parameters() if self.extra is not None else [])]
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1


class Window:
    """Loss and accuracy since the last log line, summed on the device: a step never waits for the device to
    report a number (on a GPU, `.item()` in every step stalls the queue of kernels); they are read, and the
    loss checked for NaN/inf, when a line is logged or a checkpoint written."""

    def __init__(self, device: torch.device, first_step: int, waited: float = 0.0) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen, self.first, self.started = 0, first_step, time.perf_counter()
        self.waited = waited  # the batch source's waiting time when the window opened

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.detach().double() * len(labels)  # as float64 as a Python float would be
        self.correct += (logits.argmax(1) == hard_labels(labels)).sum()
        self.seen += len(labels)

    def finite_loss(self, title: str, step: int) -> float:
        """The summed loss; an error when it is not finite (before anything is logged or saved)."""
        loss_sum = self.loss.item()
        if not math.isfinite(loss_sum):
            raise KdforgeError(f"{title}: loss became {loss_sum} between steps {self.first} and {step}; "
                               f"lower train.lr or set train.grad_clip")
        return loss_sum

    def log_event(self, title: str, state: TrainState, plan: Plan, epoch: int, parts: dict[str, torch.Tensor],
                  runtime: Runtime, waited: float = 0.0) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        loss_sum, correct, seen = runtime.all_reduce_sum(
            [self.finite_loss(title, state.step), self.correct.item(), self.seen])
        # streamed data: the share of this window's time the steps waited for their images
        data_wait = {"data_wait": min(1.0, (waited - self.waited) / max(elapsed, 1e-9))} if waited else {}
        return {
            "event": "log", "step": state.step, "total_steps": plan.total_steps, "epoch": epoch,
            "loss": loss_sum / seen, "train_top1": correct / seen,
            "lr": state.optimizer.param_groups[0]["lr"], "images_per_s": seen / max(elapsed, 1e-9),
            **{f"loss_{name}": value.item() for name, value in parts.items()}, **data_wait,
        }


# ----------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class FitResult:
    steps: int
    final: dict[str, float]  # test-split evaluation after the last step
    best: dict[str, float]  # the best epoch-end evaluation (by top-1; on the validation split when there is one)
    train_images_per_s: float = 0.0  # training throughput (forward, backward, update), evaluation excluded


@dataclass
class _Run:
    """What one `fit` call holds while it trains (so the steps below stay small functions)."""

    model: torch.nn.Module
    spec: InputSpec
    objective: Objective
    cfg: TrainConfig
    runtime: Runtime
    batches: BatchSource
    plan: Plan
    state: TrainState
    title: str
    consumers: Sequence[Consumer]
    stage_dir: Path
    checkpoint_metadata: dict[str, str]
    train_time: float = 0.0
    images_seen: int = 0

    def emit(self, event: dict[str, Any]) -> None:
        for consume in self.consumers:
            consume(event)

    def out_of_memory(self, phase: str, advice: str):
        return out_of_memory_as_error(
            f"in {self.title} on {self.runtime.device} while {phase} at batch size {self.cfg.batch_size} "
            f"({self.spec.size}x{self.spec.size}, {self.runtime.precision})", advice + KEPT)

    def train_step(self, forward, train: ImageDataset) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """One optimizer step on the next global batch: (epoch, loss, logits, labels, loss parts)."""
        runtime, step = self.runtime, self.state.step
        epoch, index = divmod(step, self.plan.steps_per_epoch)
        batch_idx = self.batches.batch_indices(len(train), self.cfg.batch_size, epoch, index)
        started = time.perf_counter()
        mine = slice(runtime.rank, None, runtime.world_size)  # this process's share of the global batch
        idx = batch_idx[mine].to(runtime.device)
        left = min(self.plan.steps_per_epoch, self.plan.total_steps - epoch * self.plan.steps_per_epoch) - index
        images, teacher_logits = self.batches.images(train, batch_idx, mine, idx, step, epoch, index, left)
        with self.out_of_memory("training", TRAIN_ADVICE):
            images, labels = self.batches.mix(images, train.labels[idx], len(train.classes), step)
            with runtime.autocast():
                logits = forward(runtime.format_input(self.model, self.spec.prepare(images)))
                loss, parts = self.objective(logits, labels, images, teacher_logits, epoch=epoch + 1)
            self.state.update(loss, self.model, self.cfg.grad_clip)
        self.images_seen += len(labels)
        self.train_time += time.perf_counter() - started
        return epoch, loss, prediction(logits), labels, parts

    def evaluate(self, split: ImageDataset) -> dict[str, float]:
        with self.out_of_memory("evaluating", EVAL_ADVICE):
            return evaluate(self.model, self.spec, split, self.cfg.batch_size, self.runtime,
                            self.cfg.limit_eval_batches)

    def end_epoch(self, watch: ImageDataset, split: str, epoch: int) -> dict[str, float]:
        """Evaluate on the split that chooses, keep the best, checkpoint."""
        metrics = self.evaluate(watch)
        is_best = metrics["top1"] > self.state.best["top1"]
        if is_best:
            self.state.best = {**metrics, "step": self.state.step, "epoch": epoch + 1}
        self.emit({"event": "eval", "split": split, "step": self.state.step, "epoch": epoch + 1, **metrics})
        self.checkpoint(is_best)
        return metrics

    def checkpoint(self, is_best: bool) -> None:
        self.state.save(self.stage_dir, self.model, self.runtime, self.checkpoint_metadata, is_best)


def fit(model: torch.nn.Module, spec: InputSpec, objective: Objective, data: DataSplits, cfg: TrainConfig,
        runtime: Runtime, batches: BatchSource, stage_dir: Path, title: str, resume_from: Path | None = None,
        consumers: Sequence[Consumer] = (), checkpoint_metadata: dict[str, str] | None = None,
        extra: torch.nn.Module | None = None) -> FitResult:
    """Train `model` in place; checkpoints go to `stage_dir`; events go to `consumers`. `extra`: modules the
    objective trains beside the model (OFA's projectors): same optimizer, saved in the training state for
    --resume, never in the model's weights.

    Each epoch ends with an evaluation on the split that chooses the best checkpoint (validation when the data
    has one; the test split is then evaluated once, at the end, for the reported numbers). Across several
    processes (torchrun), each takes its share of every global batch of `cfg.batch_size` (the same images and
    augmentation a single process would use), gradients are averaged by DistributedDataParallel, metrics are
    reduced, and only the main process checkpoints."""
    plan = Plan.create(len(data.train), cfg)
    check_processes(cfg.batch_size, runtime.world_size, batches.augment.mixes)
    runtime.place(model).train()
    if extra is not None:
        extra.to(runtime.device).train()
    forward = runtime.for_training(model)
    state = TrainState.create(model, cfg, plan, runtime, extra)
    if resume_from is not None:
        state.restore(model, resume_from, runtime)
    run = _Run(model, spec, objective, cfg, runtime, batches, plan, state, title, consumers, stage_dir,
               checkpoint_metadata or {})
    train_set, test_set = data.train.to(runtime.device), data.test.to(runtime.device)
    watch_set, watch_split = (data.val.to(runtime.device), "val") if data.val is not None else (test_set, "test")
    run.emit({"event": "start", "title": title, "step": state.step, "total_steps": plan.total_steps,
              "steps_per_epoch": plan.steps_per_epoch, "device": runtime.describe()})
    final: dict[str, float] = {}
    window = Window(runtime.device, state.step + 1)
    started, first = time.perf_counter(), train_set.streamed
    try:
        while state.step < plan.total_steps:
            epoch, loss, logits, labels, parts = run.train_step(forward, train_set)
            window.add(loss, logits, labels)
            step = state.step
            if first:  # streamed data: how long the workers took to deliver
                run.emit({"event": "note", "message": f"{title}: first step done {time.perf_counter() - started:.1f} s "
                          f"after the start ({batches.waited:.1f} s of it waiting for the first batch)"})
                first = False
            run.emit({"event": "step", "step": step})
            end_of_epoch = step % plan.steps_per_epoch == 0 or step == plan.total_steps
            every = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
            if step % cfg.log_every == 0 or step == plan.total_steps:
                run.emit(window.log_event(title, state, plan, epoch, parts, runtime, batches.waited))
                window = Window(runtime.device, step + 1, batches.waited)
            elif end_of_epoch or every:
                window.finite_loss(title, step)  # never save weights a NaN loss has reached
            if end_of_epoch:
                final = run.end_epoch(watch_set, watch_split, epoch)
            elif every:
                run.checkpoint(False)
        if not final or watch_split != "test":  # the reported numbers: the final weights on the test split
            final = run.evaluate(test_set)
            if watch_split != "test":
                run.emit({"event": "eval", "split": "test", "step": state.step, "epoch": plan.epochs, **final})
    finally:
        batches.close()
        run.emit({"event": "end", "step": state.step})
    throughput = run.images_seen * runtime.world_size / run.train_time if run.train_time else 0.0
    return FitResult(steps=state.step, final=final, best=state.best, train_images_per_s=throughput)
