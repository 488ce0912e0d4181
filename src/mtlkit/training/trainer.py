"""The training loop: K tasks, Adam, masked per-task losses, evaluation, early stopping.

One loop serves CPU, one GPU and ``torchrun`` (DDP): under an initialised process group each rank
trains on its shard of every epoch's permutation, gradients are averaged by DDP, and only rank 0
shows progress. Every rank evaluates the full validation set, so all ranks take the same
early-stopping decision.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import lr_scheduler

from mtlkit.configuration import from_mapping
from mtlkit.data.tensors import Batch, MultiTaskTensors, map_inputs
from mtlkit.errors import ConfigError, DataError, TrainingDivergedError
from mtlkit.objectives import (GradientLayout, LossWeighting, build_gradient_surgery, build_weighting, refused_scopes,
                               task_losses)
from mtlkit.objectives.replicas import assign_gradient, mean_gradients_over_replicas, mean_over_replicas
from mtlkit.objectives.weighting import tasks_with_possibly_negative_loss
from mtlkit.tasks import TaskSpec, in_float32
from mtlkit.training.checkpoint import load_training_state, save_training_state
from mtlkit.training.memory import keep_freed_memory
from mtlkit.training.metrics import HIGHER_IS_BETTER, NOT_MONITORABLE, group_auc, task_metrics
from mtlkit.training.optimizer import build_adam
from mtlkit.training.progress import progress_bar

__all__ = ["TrainerConfig", "FitResult", "Trainer", "evaluate", "forward_outputs", "score_outputs"]

LR_SCHEDULES = ("constant", "linear", "cosine")
GRADIENT_SURGERY_SCOPES = ("all", "shared", "shared_fixed")
# training.precision -> the autocast dtype of the training forward (None: no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class TrainerConfig:
    """Training options, validated on creation.

    Args:
        learning_rate: Adam's learning rate (> 0), the peak of a schedule.
        lr_schedule: ``"constant"``, or a decay over the run's steps after the warm-up: ``"linear"``
            (to 0) or ``"cosine"`` (to 0), with ``torch.optim.lr_scheduler``.
        warmup_steps: steps over which the learning rate rises linearly to ``learning_rate`` first (0: none).
        weight_decay: Adam's L2 weight decay (>= 0).
        batch_size: training rows per step.
        max_steps: stop after this many optimizer steps (None: no limit).
        max_epochs: stop after this many passes over the training rows (None: no limit). At least one
            of ``max_steps`` and ``max_epochs`` is required.
        eval_every: evaluate every this many steps (None: once per epoch).
        patience: stop after this many evaluations without improvement (None: never stop early).
        monitor: ``"loss"`` (task-weighted mean validation loss) or ``"TASK/METRIC"`` (e.g. ``"income/auc"``;
            ``"click/gauc"`` with ``fit``'s ``valid_groups``); ``"mean/METRIC"`` (``"mean/auc"``) is the
            mean of the metric over the tasks that report it (unless a task is called ``mean``).
        min_delta: smallest change that counts as an improvement.
        restore_best: load the best evaluated weights at the end.
        eval_batch_size: rows per forward during evaluation.
        seed: seeds initialisation-independent randomness of training (shuffling, dropout).
        progress: show a progress bar.
        gradient_clip: clip the global gradient norm to this value (None: off).
        weighting: registered loss weighting (``"fixed"``, ``"dynamic"``, ``"dwa"``, ``"uncertainty"``,
            ``"gradnorm"``, ``"rlw"``, ``"gls"``, ``"famo"``; :mod:`mtlkit.objectives.weighting`).
        weighting_options: options of the weighting (e.g. ``{"gamma": 0.9}`` for ``dynamic``,
            ``{"temperature": 2}`` for ``dwa``, ``{"alpha": 1.5}`` for ``gradnorm``).
        weighting_learning_rate: Adam's learning rate for the weighting's own learned parameters
            (``uncertainty``, ``gradnorm``), without weight decay; None: ``learning_rate``, as for the model.
        gradient_surgery: combine the tasks' own gradients of ``w_k L_k`` (``w_k log L_k`` for ``"db_mtl"``) with a
            registered surgery (``"pcgrad"``, ``"mgda"``, ``"cagrad"``, ``"aligned_mtl"``, ``"imtl"``, ``"nash_mtl"``,
            ``"fairgrad"``, ``"upgrad"``, ``"gradvac"``, ``"db_mtl"``, ``"metabalance"``; :mod:`mtlkit.objectives.gradient_surgery`)
            instead of summing them: one backward pass per task. Works with the weightings that learn nothing from the
            gradients (not ``gradnorm``; ``uncertainty``'s scales learn from its objective as usual, and
            with ``"imtl"`` make the IMTL paper's hybrid). Under torchrun each task's gradient is averaged
            over the replicas (their rows together, as DDP's gradient would be) and every replica runs the
            same surgery on it. None: the weighted sum's gradient.
        gradient_surgery_options: options of the surgery (``{"alpha": 0.4}`` for ``cagrad``,
            ``{"beta": 0.05, "per_layer": True}`` for ``gradvac``, ``{"main_task": "purchase"}`` for
            ``metabalance``, which needs it).
        gradient_surgery_scope: ``"all"``: the surgery combines the tasks' gradients over every
            parameter; ``"shared"``: only over the coordinates where at least two tasks have a non-zero
            gradient this step (shared experts and bottoms, OMoE's gate), as LibMTL restricts it to
            the shared parameters, while each task's own tower and gate take its gradient as it is;
            ``"shared_fixed"``: over the coordinates at least two tasks reached in the surgery's first
            step, the same set for the rest of the run (saved with the training state), so a surgery
            that keeps state per coordinate (DB-MTL, MoCo) can be restricted to the shared parameters.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
            On a GPU the training and validation tables are moved there once when each fits in half
            its free memory (batches are then gathered on the GPU), else each batch is copied over.
        compile: run the training forward, the task losses and their weighting through
            ``torch.compile`` (one graph per batch shape); falls back to eager (with a warning)
            when compilation is unavailable or fails. On the CPU, small mixtures of experts (W1's
            OMoE, MMoE, CGC and PLE in ``benchmarks/``) then train 1.23-1.47x faster, after a
            first compile of 16-21 s for a model's two batch shapes (a few seconds from inductor's
            cache after that); W1's Shared-Bottom and W2's models train slower compiled. Off by
            default: it pays for long runs of small mixtures, not for short runs
            (docs/performance-log.md, round 12).
        precision: ``"fp32"``, or ``"bf16"``: the training forward under ``torch.autocast`` with
            bfloat16 (matmuls in bf16, reductions and the losses in fp32; weights, gradients and
            Adam's state stay fp32, so no loss scaling is needed). For GPUs with bf16 tensor cores;
            evaluation, prediction and export stay in fp32. On the CPU the small-mixture node steps
            aside for autograd's modules and the large fused ReLU stacks run in bf16; bf16 measured
            0.52-0.54x fp32 on an AVX-512 BF16 Xeon without AMX and 1.53-1.76x on W2 with AMX
            (``python -m benchmarks.precision``; README, "GPUs and several machines").
        keep_freed_memory: on Linux with glibc, keep the memory a step frees for the next step
            instead of returning it to the kernel and page-faulting it back
            (:func:`mtlkit.training.memory.keep_freed_memory`; process-wide).
    """

    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 256
    max_steps: int | None = None
    max_epochs: int | None = 10
    eval_every: int | None = None
    patience: int | None = 5
    monitor: str = "loss"
    min_delta: float = 0.0
    restore_best: bool = True
    eval_batch_size: int = 16384
    seed: int = 0
    progress: bool = True
    gradient_clip: float | None = None
    weighting: str = "fixed"
    weighting_options: dict = field(default_factory=dict)
    weighting_learning_rate: float | None = None
    gradient_surgery: str | None = None
    gradient_surgery_options: dict = field(default_factory=dict)
    gradient_surgery_scope: str = "all"
    device: str = "auto"
    compile: bool = False
    precision: str = "fp32"
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        def positive_int(key: str, value: Any, optional: bool = False) -> None:
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"training.{key}: expected an integer >= 1{' or null' if optional else ''}, got {value!r}")

        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"training.learning_rate: expected a number > 0, got {self.learning_rate!r}")
        if self.weighting_learning_rate is not None and not (
                isinstance(self.weighting_learning_rate, (int, float)) and math.isfinite(self.weighting_learning_rate)
                and self.weighting_learning_rate > 0):
            raise ConfigError(f"training.weighting_learning_rate: expected a number > 0 or null, got {self.weighting_learning_rate!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"training.weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        positive_int("batch_size", self.batch_size)
        positive_int("eval_batch_size", self.eval_batch_size)
        positive_int("max_steps", self.max_steps, optional=True)
        positive_int("max_epochs", self.max_epochs, optional=True)
        positive_int("eval_every", self.eval_every, optional=True)
        positive_int("patience", self.patience, optional=True)
        for key in ("restore_best", "progress", "compile", "keep_freed_memory"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"training.{key}: expected true or false, got {getattr(self, key)!r}")
        if self.max_steps is None and self.max_epochs is None:
            raise ConfigError("training: set max_steps or max_epochs (both are null)")
        if self.gradient_clip is not None and not self.gradient_clip > 0:
            raise ConfigError(f"training.gradient_clip: expected a number > 0 or null, got {self.gradient_clip!r}")
        if not isinstance(self.monitor, str) or (self.monitor != "loss" and self.monitor.count("/") != 1):
            raise ConfigError(f"training.monitor: expected 'loss' or 'TASK/METRIC', got {self.monitor!r}")
        if self.monitor.split("/")[-1] in NOT_MONITORABLE:
            raise ConfigError(f"training.monitor: {self.monitor!r} is best at 1, not at one end, so it cannot say which "
                              "evaluation is best; monitor e.g. TASK/auc, TASK/logloss or TASK/ne")
        if self.gradient_surgery is not None:
            surgery = build_gradient_surgery(self.gradient_surgery, self.gradient_surgery_options)
            refusal = refused_scopes(surgery).get(self.gradient_surgery_scope)
            if refusal:
                raise ConfigError(f"training.gradient_surgery_scope: {self.gradient_surgery!r} {refusal}")
        elif self.gradient_surgery_options:
            raise ConfigError(f"training.gradient_surgery_options: {self.gradient_surgery_options!r} given without a gradient_surgery")
        if self.gradient_surgery_scope not in GRADIENT_SURGERY_SCOPES:
            raise ConfigError(f"training.gradient_surgery_scope: expected one of {list(GRADIENT_SURGERY_SCOPES)}, "
                              f"got {self.gradient_surgery_scope!r}")
        if self.gradient_surgery is None and self.gradient_surgery_scope != "all":
            raise ConfigError(f"training.gradient_surgery_scope: {self.gradient_surgery_scope!r} given without a gradient_surgery")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"training.lr_schedule: expected one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"training.precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ConfigError(f"training.warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainerConfig":
        return from_mapping(cls, data, "training")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class StepLosses(NamedTuple):
    """What :meth:`Trainer.train_step` returns: detached 0-d tensors on the trainer's device.

    Attributes:
        tasks: each task's loss on the batch, by task name.
        auxiliary: the model's own term of the objective (AITM's calibrator, a gate's penalty), or None.
    """

    tasks: dict[str, torch.Tensor]
    auxiliary: torch.Tensor | None


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one row per (evaluation step, split, task): ``step, epoch, split, task, loss`` and the
            task type's metrics. Split ``train`` holds the mean training loss since the last evaluation.
        best_step: step of the best monitored value (the restored weights, with ``restore_best``).
        best_value: that value.
        steps: optimizer steps taken.
        stopped_early: whether patience ran out.
        seconds: wall time of the loop.
    """

    history: list[dict[str, Any]]
    best_step: int
    best_value: float
    steps: int
    stopped_early: bool
    seconds: float

    def final(self, split: str) -> dict[str, dict[str, float]]:
        """The metrics of ``split`` at the best step, keyed by task."""
        rows = [r for r in self.history if r["split"] == split and r["step"] == self.best_step]
        return {r["task"]: {k: v for k, v in r.items() if k not in ("step", "epoch", "split", "task")} for r in rows}


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)`` that falls back to ``fn`` itself, with a warning, if compiling fails.

    One graph per batch shape (``dynamic=False``): an epoch's last, shorter batch gets its own
    rather than turning every batch's graph into a dynamic-shape one.
    """
    try:
        compiled = torch.compile(fn, dynamic=False)
    except Exception as error:  # no compiler backend on this platform
        warnings.warn(f"torch.compile unavailable ({error}); training eagerly")
        return fn
    state = {"compiled": compiled}

    def with_fallback(*args, **kwargs):
        if state["compiled"] is not None:
            try:
                return state["compiled"](*args, **kwargs)
            except Exception as error:  # a compiler error surfaces on the first call of a shape
                warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); training eagerly")
                state["compiled"] = None
        return fn(*args, **kwargs)

    return with_fallback


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            # torchrun's LOCAL_RANK: the process's place on its own machine (the global rank is not).
            local_rank = int(os.environ.get("LOCAL_RANK", "0")) if dist.is_available() and dist.is_initialized() else 0
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"training.device: unknown device {name!r}; expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            choices = "'auto' or 'cpu'" + (f" or 'cuda:0'..'cuda:{count - 1}'" if count else "")
            raise ConfigError(f"training.device: {name!r} asked for, but this machine has {count} CUDA device(s); use {choices}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
    return device


def _to_training_device(data: MultiTaskTensors, device: torch.device) -> MultiTaskTensors:
    """``data`` on ``device`` when it fits in half the GPU's free memory, so each step gathers its
    batch there; else (or on the CPU) ``data`` itself, whose batches are then copied per step."""
    if device.type == "cpu" or data.device == device:
        return data
    if device.type == "cuda" and data.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        return data
    return data.to(device)


def _check_tasks(tasks: tuple[TaskSpec, ...], data: MultiTaskTensors, split: str) -> None:
    model_names = [t.name for t in tasks]
    if data.task_names != model_names:
        raise DataError(
            f"{split} data has tasks {data.task_names} but the model has {model_names}; "
            f"the number and order of label columns must match the model's tasks (K={len(model_names)})"
        )
    for k, task in enumerate(tasks):
        task.check_labels(data.labels[:, k], f"{split} labels of task {task.name!r}")


@torch.no_grad()
def forward_outputs(model: nn.Module, data: MultiTaskTensors, tasks: tuple[TaskSpec, ...], batch_size: int = 16384,
                    device: torch.device | str | None = None,
                    after_batch: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """``{task: (N, output_dim)}`` raw outputs of ``model`` in eval mode on every row of ``data``, batch
    by batch on ``device`` (default: where the model's parameters are), gathered on the host in float32.
    ``after_batch`` is called after each batch's forward (to read what the model kept of it, such as
    its gate weights, in the same pass)."""
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        chunks: dict[str, list[torch.Tensor]] = {t.name: [] for t in tasks}
        for batch in data.batches(batch_size):
            outputs = model(map_inputs(batch.inputs, lambda t: t.to(device)))
            if after_batch is not None:
                after_batch()
            for name in chunks:
                chunks[name].append(outputs[name].float().cpu())
        return {name: torch.cat(parts) for name, parts in chunks.items()}
    finally:
        model.train(was_training)


def score_outputs(outputs: Mapping[str, torch.Tensor], data: MultiTaskTensors, tasks: tuple[TaskSpec, ...],
                  groups: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Loss and metrics of every task from its host-side ``outputs`` on ``data`` (exact over all
    labelled rows, not batch means); with ``groups`` (``(N,)`` group ids, e.g. users), binary tasks
    also get ``gauc``. Returns ``{task: {"loss": ..., metric: ..., "count": ...}}``."""
    # Only the labels come back from a GPU-held table, never its inputs.
    labels, label_mask = data.labels.cpu(), data.label_mask.cpu()
    sample_weight = None if data.sample_weight is None else data.sample_weight.cpu()
    losses = task_losses(outputs, labels, label_mask, tasks, sample_weight)
    metrics = task_metrics(outputs, labels, label_mask, tasks, sample_weight)
    if groups is not None:
        for k, task in enumerate(tasks):
            if task.type == "binary":
                mask = label_mask[:, k]
                metrics[task.name]["gauc"] = group_auc(outputs[task.name][mask, 0], labels[mask, k], groups[mask])
    return {t.name: {"loss": float(losses[t.name]), **metrics[t.name]} for t in tasks}


def evaluate(model: nn.Module, data: MultiTaskTensors, tasks: tuple[TaskSpec, ...],
             batch_size: int = 16384, device: torch.device | str | None = None,
             groups: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Loss and metrics of every task on ``data``: :func:`score_outputs` of :func:`forward_outputs`
    (the losses and metrics computed on the host, with the outputs).

    Returns ``{task: {"loss": ..., metric: ..., "count": ...}}``.
    """
    return score_outputs(forward_outputs(model, data, tasks, batch_size, device), data, tasks, groups)


class Trainer:
    """Trains a multi-task model on :class:`MultiTaskTensors`.

    Args:
        model: any :class:`~mtlkit.models.MultiTaskModel` (or a module with ``tasks`` and the same
            ``model(inputs) -> {task: output}`` contract).
        config: :class:`TrainerConfig` (or a dict of its fields).
        weighting: a :class:`LossWeighting`; built from ``config.weighting`` when omitted.

    Example::

        trainer = Trainer(model, TrainerConfig(max_steps=1000, eval_every=100))
        result = trainer.fit(train, valid)
    """

    def __init__(self, model: nn.Module, config: TrainerConfig | Mapping[str, Any] | None = None,
                 weighting: LossWeighting | None = None) -> None:
        self.config = config if isinstance(config, TrainerConfig) else TrainerConfig.from_dict(dict(config or {}))
        if self.config.keep_freed_memory:
            keep_freed_memory()
        self.tasks: tuple[TaskSpec, ...] = tuple(model.tasks)
        self.device = _resolve_device(self.config.device)
        self.model = model.to(self.device)
        self.weighting = weighting or build_weighting(self.config.weighting, self.tasks, **self.config.weighting_options)
        self.weighting.to(self.device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.train_module: nn.Module = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.model, device_ids=device_ids)
        # GradNorm-like weightings take each task's gradient on the shared layer before the backward.
        self._balanced_parameters = self.model.shared_layer_parameters() if self.weighting.balances_gradients else None
        self._autocast_dtype = PRECISIONS[self.config.precision]
        self._losses, self._objective = self._forward_losses, self._forward_objective
        # A model's own term of the objective (AITM's calibrator, DSelect-k gates' penalty, ESCM2's counterfactual
        # risk); models without one return None.
        self._auxiliary_loss = getattr(self.model, "auxiliary_loss", lambda *batch_fields: None)
        if self.config.compile and (self._balanced_parameters is not None or self.config.gradient_surgery is not None):
            # Measured in torch 2.13: a second backward through one compiled graph (retain_graph, one
            # per task) returned zero gradients, so these per-task gradients are taken eagerly.
            warnings.warn("training.compile: not used with gradnorm or gradient_surgery, which take one backward "
                          "pass per task (torch.compile's backward runs once per graph); training eagerly")
        elif self.config.compile:
            # A weighting with an epoch schedule stays out of the graph, which every new epoch would
            # recompile; any other joins it (its few operators fuse into the losses' loops).
            if self.weighting.joins_compiled_graph:
                self._objective = _compiled(self._forward_objective)
            else:
                self._losses = _compiled(self._forward_losses)
        own = list(self.weighting.parameters())  # learned weights (uncertainty, gradnorm)
        self._weighting_parameters = own
        # DDP averages the model's gradients alone; weights learned from the objective (uncertainty's) need
        # the same, or each replica drifts to its own weights. GradNorm averages its own in balance().
        self._replica_averaged_weighting = own if self.distributed and not self.weighting.balances_gradients else []
        self._surgery = None
        # Under DDP a surgery takes each task's gradient itself (torch.autograd.grad, which DDP's reducer never
        # sees) and averages them over the replicas, so the forward must not leave DDP waiting for a backward.
        self._replica_forward = contextlib.nullcontext
        self._fixed_shared_coordinates: torch.Tensor | None = None  # (P,) bool: scope shared_fixed's, from its first step
        if self.config.gradient_surgery is not None:
            if own and self.weighting.balances_gradients:
                raise ConfigError(f"training.gradient_surgery: weighting {self.config.weighting!r} learns its weights from the "
                                  "tasks' gradients, which the surgery replaces; use a weighting that learns from the "
                                  "losses (uncertainty) or none")
            self._surgery = build_gradient_surgery(self.config.gradient_surgery, self.config.gradient_surgery_options)
            self._surgery_log_losses = getattr(self._surgery, "log_losses", False)
            self._surgery_uses_layout = getattr(self._surgery, "uses_layout", False)
            self._surgery_uses_losses = getattr(self._surgery, "uses_losses", False)
            if hasattr(self._surgery, "check_tasks"):  # MetaBalance's main task
                self._surgery.check_tasks(tuple(t.name for t in self.tasks if t.weight != 0))
            if own and self._surgery_log_losses:
                raise ConfigError(f"training.gradient_surgery: {self.config.gradient_surgery!r} balances the losses' scales "
                                  f"itself (their logs); weighting {self.config.weighting!r} would learn scales it discards")
            if self._surgery_log_losses:
                negative = [f"{t.name!r} ({t.type})" for t in tasks_with_possibly_negative_loss(self.tasks)]
                if negative:
                    raise ConfigError(f"training.gradient_surgery: {self.config.gradient_surgery!r} takes the log of every "
                                      f"task's loss, and task(s) {', '.join(negative)} may have a negative one")
            self._surgery_generator = torch.Generator().manual_seed(self.config.seed)
            if self.distributed:
                self._replica_forward = self.train_module.no_sync
        if self.config.weighting_learning_rate is None:
            parameters, groups = list(self.model.parameters()) + own, ()
        elif not own:
            raise ConfigError(f"training.weighting_learning_rate: weighting {self.config.weighting!r} learns no parameters; "
                              "it applies to uncertainty and gradnorm")
        else:
            parameters, groups = list(self.model.parameters()), [{"params": own, "lr": self.config.weighting_learning_rate,
                                                                  "weight_decay": 0.0}]
        self.optimizer, self._zero_grad, self._optimizer_step = build_adam(
            parameters, self.config.learning_rate, self.config.weight_decay, self.device, self.distributed, groups)
        spec_weights = {t.name: t.weight for t in self.tasks}
        total = sum(spec_weights.values())
        self._monitor_weights = {n: (w / total if total > 0 else 1 / len(self.tasks)) for n, w in spec_weights.items()}

    def batch_objective(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss (the weighted task losses plus the model's auxiliary loss, if any) and each
        task's loss on ``batch``: the training forward, through ``torch.compile`` with ``compile``
        (model, losses and weighting as one graph per batch shape; a weighting with an epoch schedule
        stays eager)."""
        return self._step_objective(batch)[:2]

    def train_step(self, batch: Batch) -> StepLosses:
        """One optimizer step on ``batch`` (already on the trainer's device), exactly as :meth:`fit` takes
        it: the forward and the weighted objective (compiled with ``compile``), the backward (or the
        gradient surgery's per-task backwards), the replicas' averaging under DDP, gradient clipping, the
        optimizer's step and the weighting's own update (FAMO's). No host sync: the losses come back as
        detached 0-d tensors on the device. The learning-rate schedule is :meth:`fit`'s (this step uses
        the optimizer's current rate), and so is the module's train/eval mode.

        Returns:
            each task's loss (name -> 0-d tensor) and the model's auxiliary loss (None without one).
        """
        with self._replica_forward():
            total, losses, auxiliary = self._step_objective(batch)
        self._zero_grad()
        if self._balanced_parameters is not None:
            self.weighting.balance(losses, self._balanced_parameters)
        if self._surgery is None:
            total.backward()
        else:
            self._surgery_backward(losses, auxiliary)
        if self._replica_averaged_weighting:
            mean_gradients_over_replicas(self._replica_averaged_weighting)
        if self.config.gradient_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.gradient_clip)
        self._optimizer_step()
        if self.weighting.updates_after_step:  # FAMO: the step's effect on this batch's losses
            with torch.no_grad():
                self.weighting.after_step(self._losses(batch.inputs, batch.labels, batch.label_mask,
                                                       batch.sample_weight, batch.all_labelled)[0])
        return StepLosses({name: loss.detach() for name, loss in losses.items()},
                          None if auxiliary is None else auxiliary.detach())

    def _step_objective(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """:meth:`batch_objective` plus the auxiliary term on its own (None without one)."""
        return self._objective(batch.inputs, batch.labels, batch.label_mask, batch.sample_weight, batch.all_labelled)

    def _forward_losses(self, inputs, labels, label_mask, sample_weight, all_labelled):
        if self._autocast_dtype is None:
            outputs = self.train_module(inputs)
        else:
            with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                outputs = self.train_module(inputs)
            outputs = in_float32(outputs)
        losses = task_losses(outputs, labels, label_mask, self.tasks, sample_weight, all_labelled)
        return losses, self._auxiliary_loss(outputs, labels, label_mask, sample_weight)

    def _forward_objective(self, *batch_fields):
        losses, auxiliary = self._losses(*batch_fields)
        total = self.weighting(losses)[0]
        return (total if auxiliary is None else total + auxiliary), losses, auxiliary

    def _lr_scheduler(self, total_steps: int) -> lr_scheduler.LRScheduler | None:
        """The learning-rate schedule over ``total_steps`` optimizer steps (None: a constant rate, and
        Adam's kernel keeps its direct call: a scheduler wraps ``Optimizer.step``)."""
        c, optimizer = self.config, self.optimizer
        warmup = min(c.warmup_steps, total_steps)
        decay_steps = max(1, total_steps - warmup)
        decay = {"constant": None,
                 "linear": lambda: lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=decay_steps),
                 "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps)}[c.lr_schedule]
        if warmup == 0:
            return None if decay is None else decay()
        rise = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup)
        return rise if decay is None else lr_scheduler.SequentialLR(optimizer, [rise, decay()], milestones=[warmup])

    def _combine_task_gradients(self, grads: torch.Tensor, task_names: tuple[str, ...],
                                parameter_sizes: list[int], losses: torch.Tensor | None) -> torch.Tensor:
        """The configured surgery of the tasks' flat gradients ``(K, P)`` -> ``(P,)``, over the coordinates
        of ``gradient_surgery_scope`` (rows: ``task_names``; columns: the parameters' coordinates in turn,
        ``parameter_sizes`` of them each; ``losses``: the ``(K,)`` weighted losses they are the gradients of,
        for a surgery that ``uses_losses``, else None)."""
        shared = None
        if self.config.gradient_surgery_scope != "all":
            # Coordinates only one task reaches (its slice of the stacked towers, its own gate) carry no
            # conflict: they take the plain sum, and the surgery sees the rest.
            shared = self._fixed_shared_coordinates
            if shared is None:
                shared = (grads != 0).sum(0) >= 2
                if self.config.gradient_surgery_scope == "shared_fixed":
                    self._fixed_shared_coordinates = shared
            elif shared.shape[0] != grads.shape[1]:
                raise RuntimeError(f"gradient_surgery_scope shared_fixed: its shared coordinates were chosen among "
                                   f"{shared.shape[0]} parameter coordinates, but gradients over {grads.shape[1]} came")
            if not bool(shared.any()):
                return grads.sum(0)
        arguments = [grads if shared is None else grads[:, shared], self._surgery_generator]
        if self._surgery_uses_layout:
            sizes = parameter_sizes
            if shared is not None:  # each parameter's count of shared coordinates: differences of a running count at its end
                counts = shared.cumsum(0)[torch.tensor(parameter_sizes, device=shared.device).cumsum(0) - 1]
                sizes = torch.diff(counts, prepend=counts.new_zeros(1)).tolist()
            arguments.append(GradientLayout(task_names, tuple(sizes)))
        keywords = {"losses": losses} if self._surgery_uses_losses else {}
        if shared is None:
            return self._surgery(*arguments, **keywords)
        combined = grads.sum(0)
        combined[shared] = self._surgery(*arguments, **keywords)
        return combined

    def _surgery_backward(self, losses: Mapping[str, torch.Tensor], auxiliary: torch.Tensor | None = None) -> None:
        """Set every parameter's gradient to the configured surgery of the tasks' own gradients of
        ``w_k L_k`` (``w_k log L_k`` for a surgery with ``log_losses``; tasks of weight 0 left out:
        they have none), plus the gradient of the model's ``auxiliary`` term as it is (it belongs to
        no task, so no task's gradient is projected on it)."""
        total, weights = self.weighting(losses)
        if self._weighting_parameters:
            # uncertainty's scales learn from its own objective, as without a surgery (with imtl: the
            # paper's IMTL, IMTL-L's scales and IMTL-G's direction); the model's gradient is the surgery's.
            for p, g in zip(self._weighting_parameters, torch.autograd.grad(total, self._weighting_parameters, retain_graph=True)):
                assign_gradient(p, g)
        if self._surgery_log_losses:
            # DB-MTL's loss-scale balancing: a loss's scale no longer sets its gradient's (the reference's 1e-8
            # keeps a task without labelled rows, loss exactly 0, finite; its gradient is then 0).
            losses = {name: torch.log(loss + 1e-8) for name, loss in losses.items()}
        weighted = [t.name for t in self.tasks if float(weights[t.name]) != 0.0]
        terms = [float(weights[name]) * losses[name] for name in weighted]
        if not terms and auxiliary is None:
            return  # every weight 0: the gradients stay zero
        parameters = [p for p in self.model.parameters() if p.requires_grad]

        def flat_gradient(term: torch.Tensor, retain: bool) -> torch.Tensor:
            grads = torch.autograd.grad(term, parameters, retain_graph=retain, allow_unused=True)
            return torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(-1)
                              for p, g in zip(parameters, grads)])

        task_grads = torch.stack([flat_gradient(term, k < len(terms) - 1 or auxiliary is not None)
                                  for k, term in enumerate(terms)]) if terms else None
        stacked_losses = torch.stack([term.detach() for term in terms]) if self._surgery_uses_losses and terms else None
        auxiliary_grad = flat_gradient(auxiliary, False) if auxiliary is not None else None
        if self.distributed:
            # Each replica's gradients are of its own rows; their mean is the whole batch's, as DDP's would be, and
            # every replica then runs the same surgery on the same numbers (its generator seeded alike).
            task_grads, stacked_losses, auxiliary_grad = (None if t is None else mean_over_replicas(t)
                                                          for t in (task_grads, stacked_losses, auxiliary_grad))
        combined = (self._combine_task_gradients(task_grads, tuple(weighted), [p.numel() for p in parameters],
                                                 stacked_losses) if task_grads is not None else 0.0)
        if auxiliary_grad is not None:
            combined = combined + auxiliary_grad
        offset = 0
        for p in parameters:
            assign_gradient(p, combined[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    @property
    def _higher_is_better(self) -> bool:
        return self.config.monitor.split("/")[-1] in HIGHER_IS_BETTER

    def _monitored(self, scores: dict[str, dict[str, float]]) -> float:
        """The monitored value of one evaluation."""
        if self.config.monitor == "loss":
            return sum(self._monitor_weights[n] * scores[n]["loss"] for n in scores)
        task, metric = self.config.monitor.split("/")
        if task == "mean" and task not in scores:
            # Model selection across tasks: the plain mean over the tasks that report the metric.
            values = [s[metric] for s in scores.values() if metric in s and s[metric] == s[metric]]
            if not values:
                available = sorted({m for s in scores.values() for m in s})
                raise ConfigError(f"training.monitor: {self.config.monitor!r}: no task reports {metric!r}; available: {available}")
            return sum(values) / len(values)
        if task not in scores or metric not in scores[task]:
            available = {n: sorted(v) for n, v in scores.items()}
            raise ConfigError(f"training.monitor: {self.config.monitor!r} is not reported; available: {available}")
        return scores[task][metric]

    def fit(self, train: MultiTaskTensors, valid: MultiTaskTensors | None = None,
            extra_eval: Mapping[str, MultiTaskTensors] | None = None,
            step_callback: Callable[[int], None] | None = None,
            valid_groups: torch.Tensor | None = None,
            state_file: str | os.PathLike | None = None) -> FitResult:
        """Train; evaluate on ``valid`` (early stopping, best-weight restore) and on ``extra_eval`` sets
        (recorded in the history only, never used for decisions). ``step_callback(step)`` is called
        after every optimizer step (benchmarks time windows of steps with it). ``valid_groups``
        (``(len(valid),)`` group ids, e.g. users) adds each binary task's ``gauc`` to the validation
        scores, so that ``monitor`` can be ``"click/gauc"``.

        ``state_file``: after every epoch that does not end the run, the whole training state
        (weights, optimizer, weighting, learning-rate schedule, random generators, history, early
        stopping) is written there atomically; a ``fit`` that finds the file resumes after that
        epoch, and on the CPU ends with exactly the numbers of a run never interrupted. The file is
        left in place; a different configuration, table size or model is a :class:`ConfigError`."""
        c = self.config
        _check_tasks(self.tasks, train, "train")
        if valid is not None:
            _check_tasks(self.tasks, valid, "valid")
        if valid_groups is not None and (valid is None or len(valid_groups) != len(valid)):
            raise DataError(f"valid_groups: expected one group id per validation row "
                            f"({0 if valid is None else len(valid)}), got {len(valid_groups)}")
        for name, data in (extra_eval or {}).items():
            _check_tasks(self.tasks, data, name)
        train = _to_training_device(train, self.device)
        copy_batches = train.device != self.device  # a table too large for the GPU: each batch is copied
        valid = None if valid is None else _to_training_device(valid, self.device)
        extra_eval = {name: _to_training_device(data, self.device) for name, data in (extra_eval or {}).items()}
        torch.manual_seed(c.seed + self.rank)
        generator = torch.Generator().manual_seed(c.seed)  # same permutation on every rank, then sharded

        rows_per_epoch = len(train) // self.world_size
        steps_per_epoch = max(1, math.ceil(rows_per_epoch / c.batch_size))
        limits = [s for s in (c.max_steps, c.max_epochs and c.max_epochs * steps_per_epoch) if s]
        total_steps = min(limits)
        eval_every = c.eval_every or steps_per_epoch
        scheduler = self._lr_scheduler(total_steps)

        history: list[dict[str, Any]] = []
        best_value = -math.inf if self._higher_is_better else math.inf
        best_step, best_state = 0, None
        stale, stopped_early, step, epoch = 0, False, 0, 0
        running = [torch.zeros((), device=self.device) for _ in self.tasks]
        running_auxiliary: torch.Tensor | None = None  # the model's auxiliary loss, summed like the task losses
        running_steps = 0
        start = time.perf_counter()
        self.train_module.train()

        def record(split: str, scores: dict[str, dict[str, float]]) -> None:
            for name, values in scores.items():
                history.append({"step": step, "epoch": epoch, "split": split, "task": name, **values})

        identity = self._run_identity(train, total_steps)
        resumed_seconds = 0.0
        if state_file is not None and os.path.exists(state_file):
            saved = self._restore(state_file, identity, scheduler, generator)
            step, epoch, stale = saved["step"], saved["epoch"], saved["stale"]
            best_value, best_step, best_state = saved["best_value"], saved["best_step"], saved["best_state"]
            history, running_steps, resumed_seconds = saved["history"], saved["running_steps"], saved["seconds"]
            running = [value.to(self.device) for value in saved["running"]]
            if saved.get("running_auxiliary") is not None:
                running_auxiliary = saved["running_auxiliary"].to(self.device)

        with progress_bar(total_steps, "training", enabled=c.progress and self.rank == 0) as advance:
            advance(step)
            while step < total_steps and not stopped_early:
                shard = train
                if self.world_size > 1:
                    order = torch.randperm(len(train), generator=generator)
                    shard = train.subset(order[self.rank::self.world_size][:rows_per_epoch])
                for batch in shard.batches(c.batch_size, shuffle=True, generator=generator):
                    if copy_batches:
                        batch = batch.to(self.device)
                    losses, auxiliary = self.train_step(batch)
                    if scheduler is not None:
                        scheduler.step()
                    torch._foreach_add_(running, list(losses.values()))
                    if auxiliary is not None:
                        if running_auxiliary is None:
                            running_auxiliary = torch.zeros((), device=self.device)
                        running_auxiliary.add_(auxiliary)
                    running_steps += 1
                    step += 1
                    advance(1)
                    if step_callback is not None:
                        step_callback(step)
                    if step % eval_every == 0 or step == total_steps:
                        # The only host sync: once per evaluation, never per step.
                        means = (torch.stack(running) / running_steps).tolist()
                        self._check_finite({t.name: v for t, v in zip(self.tasks, means)}, "training", step, epoch, running_steps)
                        weights = self.weighting.current_weights()
                        # The model's auxiliary loss (AITM's calibrator, the gates' penalty) belongs to no task: the same value on each row.
                        extra = {}
                        if running_auxiliary is not None:
                            extra = {"auxiliary_loss": float(running_auxiliary) / running_steps}
                            self._check_finite({"(auxiliary loss)": extra["auxiliary_loss"]}, "training", step, epoch, running_steps)
                            running_auxiliary.zero_()
                        record("train", {t.name: {"loss": v, "weight": weights[t.name], **extra} for t, v in zip(self.tasks, means)})
                        torch._foreach_zero_(running)
                        running_steps = 0
                        if valid is not None:
                            scores = evaluate(self.model, valid, self.tasks, c.eval_batch_size, self.device, valid_groups)
                            self._check_finite({n: v["loss"] for n, v in scores.items()}, "validation", step, epoch)
                            record("valid", scores)
                            value = self._monitored(scores)
                            improved = (value > best_value + c.min_delta) if self._higher_is_better else (value < best_value - c.min_delta)
                            if improved or best_step == 0:
                                best_value, best_step, stale = value, step, 0
                                if c.restore_best:
                                    best_state = copy.deepcopy(self.model.state_dict())
                            else:
                                stale += 1
                                if c.patience is not None and stale >= c.patience:
                                    stopped_early = True
                        for name, data in (extra_eval or {}).items():
                            record(name, evaluate(self.model, data, self.tasks, c.eval_batch_size, self.device))
                        self.train_module.train()
                    if step >= total_steps or stopped_early:
                        break
                epoch += 1
                self.weighting.on_epoch_end(epoch - 1)
                if state_file is not None and step < total_steps and not stopped_early:
                    self._save_state(state_file, identity, scheduler, generator, {
                        "step": step, "epoch": epoch, "stale": stale, "best_value": best_value, "best_step": best_step,
                        "best_state": best_state, "history": history, "running": [r.cpu() for r in running],
                        "running_auxiliary": None if running_auxiliary is None else running_auxiliary.cpu(),
                        "running_steps": running_steps, "seconds": resumed_seconds + time.perf_counter() - start})

        if valid is None:
            best_step, best_value = step, math.nan
        elif best_state is not None:
            self.model.load_state_dict(best_state)
        return FitResult(history=history, best_step=best_step, best_value=best_value,
                         steps=step, stopped_early=stopped_early, seconds=resumed_seconds + time.perf_counter() - start)

    def _check_finite(self, losses: Mapping[str, float], split: str, step: int, epoch: int, steps: int | None = None) -> None:
        """Stop with a :class:`TrainingDivergedError` when a task's loss is NaN or infinite: every
        later step would train on it, and early stopping would compare NaNs."""
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if bad:
            over = f"mean over the last {steps} steps" if steps else "on the validation rows"
            raise TrainingDivergedError(
                f"training diverged at step {step} (epoch {epoch + 1}): the {split} loss of task(s) {bad} ({over}) is "
                "not finite; lower training.learning_rate, set training.gradient_clip, or check the labels' scale "
                "(schema.standardize_labels for regression tasks)")

    def _run_identity(self, train: MultiTaskTensors, total_steps: int) -> dict[str, Any]:
        """What a saved training state must match to be resumed: the same training, model and table size."""
        options = {k: v for k, v in self.config.to_dict().items() if k not in ("progress", "device")}
        return {"config": options, "train_rows": len(train), "total_steps": total_steps, "world_size": self.world_size,
                "tasks": [t.name for t in self.tasks],
                "parameters": {name: list(p.shape) for name, p in self.model.named_parameters()}}

    def _save_state(self, path, identity, scheduler, generator, loop: dict[str, Any]) -> None:
        if self.rank == 0:
            save_training_state(path, {
                "identity": identity, "loop": loop,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "weighting": self.weighting.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "generator": generator.get_state(), "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "surgery_generator": self._surgery_generator.get_state() if self._surgery is not None else None,
                "surgery": self._surgery.state_dict() if hasattr(self._surgery, "state_dict") else None,
                "surgery_coordinates": None if self._fixed_shared_coordinates is None else self._fixed_shared_coordinates.cpu()})
        if self.distributed:
            dist.barrier()  # no rank moves on before the file is whole

    def _restore(self, path, identity, scheduler, generator) -> dict[str, Any]:
        state = load_training_state(path)
        if state["identity"] != identity:
            saved = state["identity"]
            differs = sorted(k for k in identity if saved.get(k) != identity[k])
            # Saved then now, for what differs (the training options key by key; not every parameter shape).
            detail = {k: (saved.get(k), identity[k]) for k in differs if k not in ("parameters", "config")}
            old, new = saved.get("config", {}), identity["config"]
            detail.update({f"training.{k}": (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)})
            raise ConfigError(f"training state {path}: saved by a different run ({', '.join(differs)} differ"
                              f"{': ' + str(detail) if detail else ''}); delete it to start afresh")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weighting.load_state_dict(state["weighting"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state["surgery_generator"] is not None and self._surgery is not None:
            self._surgery_generator.set_state(state["surgery_generator"])
        if state.get("surgery") is not None and hasattr(self._surgery, "load_state_dict"):  # GradVac's targets, DB-MTL's averages
            self._surgery.load_state_dict(state["surgery"])
        if state.get("surgery_coordinates") is not None and self._surgery is not None:  # scope shared_fixed's set
            self._fixed_shared_coordinates = state["surgery_coordinates"].to(self.device)
        return state["loop"]
