"""Loss weighting: how per-task losses become one objective.

A weighting receives ``{task: loss}`` and returns the total plus the weights it used (for logging).
The trainer holds one by composition; new schemes register with :func:`register_weighting`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mtlkit.configuration import check_count, check_non_negative, check_positive
from mtlkit.errors import ConfigError
from mtlkit.objectives.losses import TaskLosses
from mtlkit.objectives.replicas import mean_over_replicas
from mtlkit.tasks import TaskSpec

__all__ = [
    "LossWeighting", "FixedWeighting", "DynamicWeighting", "DynamicWeightAverage", "UncertaintyWeighting",
    "GradNormWeighting", "RandomLossWeighting", "FastAdaptiveWeighting", "GeometricLossWeighting",
    "register_weighting", "build_weighting", "list_weightings", "NON_NEGATIVE_LOSS_TYPES", "tasks_with_possibly_negative_loss",
]


class LossWeighting(nn.Module):
    """Base class. ``forward(losses) -> (total, {task: weight})``.

    A weighting that learns from the tasks' gradients sets ``balances_gradients`` and implements
    :meth:`balance`, which the trainer calls every step between the forward and the backward. One
    that learns from how the step changed the losses sets ``updates_after_step`` and implements
    :meth:`after_step`.
    """

    balances_gradients: bool = False
    updates_after_step: bool = False

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the trainer after every epoch (for schedules)."""

    def _loss_vector(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(K,)`` the tasks' losses in this weighting's task order: the trainer's stacked vector when
        it has one (no copy), else a stack."""
        vector = losses.vector_for(self.task_names) if isinstance(losses, TaskLosses) else None
        return torch.stack([losses[name] for name in self.task_names]) if vector is None else vector

    def balance(self, losses: Mapping[str, torch.Tensor], shared: Sequence[torch.Tensor]) -> None:
        """Set the gradients of this weighting's own parameters from ``losses`` (their graphs are kept
        for the model's backward) and ``shared``, the parameters of the model's last shared layer."""
        raise NotImplementedError

    def after_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        """With ``updates_after_step``: called after every optimizer step with the tasks' losses on
        the step's batch, computed again by the updated model (without gradients)."""
        raise NotImplementedError

    @property
    def joins_compiled_graph(self) -> bool:
        """Whether ``training.compile`` may trace this weighting with the model and losses: not one
        with an epoch schedule (every new epoch would recompile) or with a step of its own."""
        return type(self).on_epoch_end is LossWeighting.on_epoch_end and not self.updates_after_step

    def current_weights(self) -> dict[str, float]:
        """``{task: weight}`` as the next step will use them (logged in the training history; NaN
        for a weighting that does not say)."""
        weights = self._weights_for_log()
        return {name: float(weights[name]) if name in weights else float("nan") for name in self.task_names}

    def _weights_for_log(self) -> Mapping[str, float | torch.Tensor]:
        return getattr(self, "weights", {})


class FixedWeighting(LossWeighting):
    """``L = sum_k w_k L_k`` with each task's ``TaskSpec.weight`` (1 by default: equal weights)."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.weights = {t.name: float(t.weight) for t in tasks}

    def get_extra_state(self) -> dict[str, Any]:
        # Schedules change the weights between epochs; a resumed run needs them (and DWA its loss means).
        return {"weights": dict(self.weights)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.weights = dict(state["weights"])

    def forward(self, losses):
        vector = losses.vector_for(self.task_names) if isinstance(losses, TaskLosses) else None
        if vector is not None and all(w == 1.0 for w in self.weights.values()):
            return vector.sum(), dict(self.weights)
        terms = [losses[name] if self.weights[name] == 1.0 else self.weights[name] * losses[name]
                 for name in self.task_names if self.weights[name] != 0.0]
        total = terms[0] if terms else 0.0 * next(iter(losses.values()))
        for term in terms[1:]:  # no "0 +" start value: one op fewer per step
            total = total + term
        return total, dict(self.weights)


class DynamicWeighting(FixedWeighting):
    """The PLE paper's schedule ``w_k(t) = w_k0 * gamma_k ** t`` with ``t`` the epoch.

    Args:
        gamma: one decay factor for all tasks or ``{task: gamma}``.
    """

    def __init__(self, tasks: Sequence[TaskSpec], gamma: float | Mapping[str, float] = 1.0) -> None:
        super().__init__(tasks)
        gammas = gamma if isinstance(gamma, Mapping) else {name: gamma for name in self.task_names}
        unknown = sorted(set(gammas) - set(self.task_names))
        if unknown:
            raise ConfigError(f"weighting.gamma: unknown task(s) {unknown}; tasks are {self.task_names}")
        for name, value in gammas.items():
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"weighting.gamma[{name!r}]: expected a number > 0, got {value!r}")
        self.gammas = {name: float(gammas.get(name, 1.0)) for name in self.task_names}
        self.initial = dict(self.weights)

    def on_epoch_end(self, epoch: int) -> None:
        self.weights = {name: self.initial[name] * self.gammas[name] ** (epoch + 1) for name in self.task_names}


class DynamicWeightAverage(FixedWeighting):
    """Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019): a task whose training loss fell
    less over the last epoch gets more weight in the next.

    ``w_k(t) = w_k0 * K * softmax_k(r(t-1) / temperature)`` with ``r_k(t-1) = L_k(t-1) / L_k(t-2)``,
    the ratio of the task's mean training losses over the last two epochs (``w_k0``: the task's own
    weight); the first two epochs use ``w_k0``. The epoch means are kept in this module (one addition
    of the detached ``(K,)`` losses per step, no host sync) and, under torchrun, averaged over the
    processes so that every replica uses the same weights.

    Args:
        temperature: softness of the softmax; large values tend to equal weights (the paper: 2).
    """

    def __init__(self, tasks: Sequence[TaskSpec], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"weighting.temperature: expected a number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.initial = dict(self.weights)
        self.epoch_means: list[torch.Tensor] = []  # the last two epochs' (K,) mean losses
        self._sums: torch.Tensor | None = None
        self._steps = 0

    def forward(self, losses):
        if self.training:
            sums = self._loss_vector(losses).detach()
            self._sums = sums.clone() if self._sums is None else self._sums.add_(sums)
            self._steps += 1
        return super().forward(losses)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "epoch_means": [m.tolist() for m in self.epoch_means]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.epoch_means = [torch.tensor(m) for m in state["epoch_means"]]

    def on_epoch_end(self, epoch: int) -> None:
        if self._sums is None:
            return
        means = mean_over_replicas(self._sums / self._steps)
        self.epoch_means = (self.epoch_means + [means.cpu()])[-2:]  # one host copy an epoch
        self._sums, self._steps = None, 0
        if len(self.epoch_means) == 2:
            previous, last = self.epoch_means
            ratios = last / previous.clamp_min(torch.finfo(last.dtype).tiny)
            factors = (len(self.task_names) * torch.softmax(ratios / self.temperature, dim=0)).tolist()
            self.weights = {name: self.initial[name] * f for name, f in zip(self.task_names, factors)}


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall et al., 2018): ``sum_k exp(-s_k) L_k + s_k``.

    ``s_k`` are learned; the trainer optimises them with the model (they are parameters of this module).
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.log_variance = nn.Parameter(torch.zeros(len(tasks)))

    def _weights_for_log(self):
        return dict(zip(self.task_names, torch.exp(-self.log_variance.detach()).tolist()))

    def forward(self, losses):
        total = 0.0
        weights: dict[str, float | torch.Tensor] = {}
        for k, name in enumerate(self.task_names):
            precision = torch.exp(-self.log_variance[k])
            total = total + precision * losses[name] + self.log_variance[k]
            weights[name] = precision.detach()
        return total, weights


class GradNormWeighting(LossWeighting):
    """GradNorm (Chen et al., ICML 2018): weights learned so that the tasks' gradients on the last
    layer every task shares have balanced norms, larger for tasks that have trained less.

    The weights are ``w_k = w_k0 * K * softmax(logits)_k`` (``w_k0``: the task's own weight; the
    softmax keeps their sum at ``K`` without renormalising after each step). The model steps on
    ``sum_k w_k L_k`` with the weights held constant. Each step, :meth:`balance` sets the logits'
    gradient to that of ``sum_k |G_k - mean(G) * r_k ** alpha|``, where ``G_k = w_k ||grad_W L_k||`` is
    task ``k``'s gradient norm on the shared layer ``W`` and ``r_k`` its loss over its first step's
    loss, relative to the tasks' mean of that ratio (the target is held constant); the trainer's Adam
    then steps them with the model. That costs one backward pass per task down to ``W`` each step.

    Args:
        alpha: how strongly tasks that lag behind are favoured (the paper: 0.5-3; 0 balances the
            gradient norms alone).
    """

    balances_gradients = True

    def __init__(self, tasks: Sequence[TaskSpec], alpha: float = 1.5) -> None:
        super().__init__(tasks)
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ConfigError(f"weighting.alpha: expected a number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.logits = nn.Parameter(torch.zeros(len(tasks)))
        self.register_buffer("base_weights", torch.tensor([float(t.weight) for t in tasks]))
        self.register_buffer("initial_losses", torch.full((len(tasks),), float("nan")))
        self._has_initial_losses = False

    @property
    def joins_compiled_graph(self) -> bool:
        return False  # balance() takes gradients of single losses between the forward and the backward

    def weight_vector(self) -> torch.Tensor:
        """``(K,)`` the current weights, differentiable with respect to ``logits``."""
        return self.base_weights * len(self.task_names) * torch.softmax(self.logits, dim=0)

    def _weights_for_log(self):
        return dict(zip(self.task_names, self.weight_vector().detach().tolist()))

    def forward(self, losses):
        weights = self.weight_vector().detach()
        return (weights * self._loss_vector(losses)).sum(), dict(zip(self.task_names, weights.unbind()))

    def balance(self, losses, shared):
        """Set ``logits.grad`` to the gradient of the GradNorm loss of this step's ``losses``."""
        vector = self._loss_vector(losses)
        norms = []
        for name in self.task_names:
            grads = torch.autograd.grad(losses[name], shared, retain_graph=True, allow_unused=True)
            squares = [(g * g).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else vector.new_zeros(()))
        with torch.no_grad():
            if not self._has_initial_losses:  # a Python flag: no host sync per step after the first
                if torch.isnan(self.initial_losses).any():  # not restored from a saved state
                    # One reference on every replica, the one a resumed run restores (rank 0 saves it).
                    self.initial_losses.copy_(mean_over_replicas(vector.detach().clone()))
                self._has_initial_losses = True
            ratio = vector.detach() / self.initial_losses.clamp_min(torch.finfo(vector.dtype).tiny)
        active = self.base_weights > 0  # a task of weight 0 has no gradient to balance
        norm_vector = torch.stack(norms)
        with torch.enable_grad():
            gradient_norms = (self.weight_vector() * norm_vector)[active]
            relative = ratio[active] / ratio[active].mean()
            target = (gradient_norms.mean() * relative ** self.alpha).detach()
            (grad,) = torch.autograd.grad((gradient_norms - target).abs().sum(), self.logits)
        grad = mean_over_replicas(grad)  # the same weights on every replica
        if self.logits.grad is None:
            self.logits.grad = grad
        else:
            self.logits.grad.copy_(grad)


class RandomLossWeighting(LossWeighting):
    """Random loss weighting (RLW, Lin et al., TMLR 2022): every step draws fresh weights
    ``w_k = w_k0 * K * softmax(e)_k`` with ``e ~ N(0, I)`` (``w_k0``: the task's own weight), so their
    sum stays ``K``. A baseline that costs nothing, which a learned or tuned weighting should beat.

    The draws come from the weighting's own generator (``seed``), not the global one: every process
    under torchrun draws the same weights, and a resumed run continues the sequence (the generator's
    state is in the state dict). Under gradient surgery the trainer asks for the weights twice a step
    and the second draw is the one its gradients use.

    Args:
        seed: seed of the weights' generator.
    """

    def __init__(self, tasks: Sequence[TaskSpec], seed: int = 0) -> None:
        super().__init__(tasks)
        check_count(seed, "weighting.seed", 0)
        self.base_weights = torch.tensor([float(t.weight) for t in tasks])
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = {t.name: float(t.weight) for t in tasks}

    @property
    def joins_compiled_graph(self) -> bool:
        return False  # a host-side draw from its own generator every step

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "weights": dict(self.weights)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.weights = dict(state["weights"])

    def forward(self, losses):
        draw = torch.softmax(torch.randn(len(self.task_names), generator=self.generator, dtype=torch.float64), dim=0)
        weights = (self.base_weights.double() * len(self.task_names) * draw).float()
        self.weights = dict(zip(self.task_names, weights.tolist()))
        vector = self._loss_vector(losses)
        return (weights.to(vector.device, vector.dtype) * vector).sum(), dict(self.weights)


# Task types whose loss is never negative, so that its logarithm is defined (poisson's and ziln's can be
# negative): the log-based weightings (famo, gls) and DB-MTL need a bound for any other.
NON_NEGATIVE_LOSS_TYPES = ("binary", "regression", "huber", "multiclass")


def tasks_with_possibly_negative_loss(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    """The weighted tasks (weight != 0) whose loss may be negative, so has no logarithm (poisson, ziln)."""
    return [t for t in tasks if t.weight != 0 and t.type not in NON_NEGATIVE_LOSS_TYPES]


class GeometricLossWeighting(LossWeighting):
    """Geometric loss strategy (GLS, Chennupati et al., CVPR Workshops 2019): the objective is the
    tasks' weighted geometric mean ``W exp(sum_k w_k log L_k / W)`` (``w_k``: the tasks' own weights,
    ``W`` their sum), so task ``k``'s gradient is weighted by ``w_k G / L_k`` (``G`` the geometric mean):
    the fixed weights where all losses are equal, and otherwise more weight to the tasks whose loss
    is smaller; scaling one task's loss changes no task's share. No state and no extra pass.

    A task without labelled rows in a batch (loss exactly 0) takes no part in that step. Every
    task's loss must be non-negative: ``poisson`` (``exp(o) - y o``) and ``ziln`` tasks are an error.
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        negative = tasks_with_possibly_negative_loss(tasks)
        if negative:
            raise ConfigError(f"weighting gls: task {negative[0].name!r} ({negative[0].type}) may have a negative loss, and the "
                              "geometric mean needs positive ones; use famo with min_losses, or another weighting")
        self.register_buffer("base_weights", torch.tensor([float(t.weight) for t in tasks]))
        self.weights = {t.name: float(t.weight) for t in tasks}

    def forward(self, losses):
        vector = self._loss_vector(losses)
        present = (vector > 0) & (self.base_weights != 0)
        weights = torch.where(present, self.base_weights, 0.0)
        total_weight = weights.sum()
        log_mean = (weights * torch.where(present, vector, 1.0).log()).sum() / total_weight.clamp_min(1e-30)
        total = total_weight * torch.exp(log_mean)
        effective = torch.where(present, weights * torch.exp(log_mean.detach()) / torch.where(present, vector, 1.0).detach(), 0.0)
        self.weights = dict(zip(self.task_names, effective.unbind()))  # floats only when logged
        return total, dict(self.weights)


class FastAdaptiveWeighting(LossWeighting):
    """FAMO ("fast adaptive multitask optimization", Liu et al., NeurIPS 2023): balances the tasks'
    rates of improvement at the cost of one extra forward pass a step, not one backward pass per
    task. The objective is ``K sum_k w_k0 z_k log(L_k - m_k) / c`` with ``z = softmax(xi)`` and
    ``c = sum_k z_k / (L_k - m_k)`` (held constant), so task ``k``'s gradient is weighted by
    ``K w_k0 z_k / (c (L_k - m_k))``: weights summing to ``K`` (all ``w_k0`` 1) that, at equal logits,
    favour the tasks whose losses are smallest. After each optimizer step the losses on the same batch
    are computed again; ``xi`` then takes an Adam step (``learning_rate``, ``weight_decay``) down
    ``J' delta``, ``delta_k = log(L_k - m_k) - log(L'_k - m_k)`` the task's log improvement and ``J`` the
    softmax's Jacobian, so a task that improved more than the weighted average loses weight.

    ``m_k`` (``min_losses``, default 0) is a lower bound of each task's loss; a task type whose
    loss can be negative (``poisson``: ``exp(o) - y o``) needs one. Tasks of weight 0 take no part.
    Under torchrun the improvements are averaged over the processes, so every replica keeps the same
    ``xi``. Logged weights are the last step's effective ones.

    Args:
        learning_rate: Adam's step size for ``xi`` (the paper: 0.025).
        weight_decay: L2 decay pulling ``xi`` back to equal weights (the paper: 0.001).
        min_losses: ``{task: lower bound of its loss}``.
    """

    updates_after_step = True

    def __init__(self, tasks: Sequence[TaskSpec], learning_rate: float = 0.025, weight_decay: float = 1e-3,
                 min_losses: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        self.learning_rate = check_positive(learning_rate, "weighting.learning_rate")
        self.weight_decay = check_non_negative(weight_decay, "weighting.weight_decay")
        if not isinstance(min_losses, Mapping | None):
            raise ConfigError(f"weighting.min_losses: expected a mapping of task names to numbers, got {min_losses!r}")
        min_losses = dict(min_losses or {})
        unknown = sorted(set(min_losses) - set(self.task_names))
        if unknown:
            raise ConfigError(f"weighting.min_losses: unknown task(s) {unknown}; expected some of {self.task_names}")
        for task in tasks_with_possibly_negative_loss(tasks):
            if task.name not in min_losses:
                raise ConfigError(f"weighting.min_losses: task {task.name!r} ({task.type}) may have a negative loss; FAMO "
                                  "takes the log of loss - bound, so give its lower bound (e.g. min_losses: "
                                  f"{{{task.name}: -10}})")
        floors = [float(min_losses.get(name, 0.0)) for name in self.task_names]
        if not all(math.isfinite(f) for f in floors):
            raise ConfigError(f"weighting.min_losses: expected finite numbers, got {min_losses!r}")
        self.register_buffer("base_weights", torch.tensor([float(t.weight) for t in tasks]))
        self.register_buffer("floors", torch.tensor(floors))
        self.register_buffer("logits", torch.zeros(len(tasks)))
        self.register_buffer("first_moment", torch.zeros(len(tasks)))
        self.register_buffer("second_moment", torch.zeros(len(tasks)))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.num_active = sum(t.weight != 0 for t in tasks)  # K: read on the host once, not synced every step
        self.weights = {t.name: float(t.weight) for t in tasks}
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None  # the last training forward's log gaps

    def _log_gaps(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``log(L_k - m_k + 1e-8)`` (the paper's 1e-8 keeps it finite at the bound), and which tasks
        take part: a non-zero weight and a loss above its bound. A loss at its bound (a task without
        labelled rows in the batch: an exact 0) has no gradient to weight; it would take all the weight."""
        gaps = self._loss_vector(losses) - self.floors
        present = (gaps > 0) & (self.base_weights != 0)
        return torch.where(present, gaps.clamp_min(0) + 1e-8, 1.0).log(), present

    def _mix(self) -> torch.Tensor:
        """``z``: the softmax of the logits over the tasks of non-zero weight (0 for the others)."""
        return torch.softmax(self.logits.masked_fill(self.base_weights == 0, -torch.inf), dim=0)

    def forward(self, losses):
        log_gaps, present = self._log_gaps(losses)
        mix = self._mix()
        inverse = torch.where(present, mix * torch.exp(-log_gaps.detach()), 0.0)  # z_k / (L_k - m_k)
        scale = self.num_active * self.base_weights / inverse.sum().clamp_min(1e-30)
        if self.training:
            self._previous = (log_gaps.detach(), present)
        total = (torch.where(present, mix * log_gaps, 0.0) * scale).sum()
        weights = (inverse * scale).detach()
        self.weights = dict(zip(self.task_names, weights.unbind()))  # floats only when logged
        return total, dict(self.weights)

    def after_step(self, losses):
        if self._previous is None:
            return
        (previous, was_present), (now, present) = self._previous, self._log_gaps(losses)
        improvement = torch.where(was_present & present, previous - now.detach(), 0.0)
        self._previous = None
        improvement = mean_over_replicas(improvement)  # the same logits on every replica
        mix = self._mix()
        # J' delta for J = diag(z) - z z', the softmax's Jacobian; then Adam with L2 decay (torch.optim.Adam's form).
        grad = mix * (improvement - (mix * improvement).sum()) + self.weight_decay * self.logits
        beta1, beta2 = 0.9, 0.999
        self.updates += 1
        self.first_moment.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        first = self.first_moment / (1 - beta1 ** self.updates)
        second = self.second_moment / (1 - beta2 ** self.updates)
        self.logits.sub_(self.learning_rate * first / (second.sqrt() + 1e-8))

    def _weights_for_log(self) -> Mapping[str, float | torch.Tensor]:
        return self.weights


_WEIGHTINGS: dict[str, Callable[..., LossWeighting]] = {}


def register_weighting(name: str, factory: Callable[..., LossWeighting]) -> None:
    """Register a weighting factory ``factory(tasks, **options)`` under ``name``."""
    if name in _WEIGHTINGS:
        raise ValueError(f"weighting {name!r} is already registered")
    _WEIGHTINGS[name] = factory


def list_weightings() -> list[str]:
    return sorted(_WEIGHTINGS)


def get_weighting(name: str) -> Callable[..., LossWeighting]:
    """The registered weighting factory called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    if name not in _WEIGHTINGS:
        raise ConfigError(f"weighting: unknown {name!r}; expected one of {list_weightings()}")
    return _WEIGHTINGS[name]


def weighting_options(name: str) -> dict[str, Any]:
    """The options the weighting ``name`` takes (``training.weighting_options``), each with its default."""
    return {p.name: p.default for p in list(inspect.signature(get_weighting(name)).parameters.values())[1:]}


def build_weighting(name: str, tasks: Sequence[TaskSpec], **options: Any) -> LossWeighting:
    """Build a registered weighting; unknown names and options are errors that name them."""
    factory = get_weighting(name)
    try:
        return factory(tasks, **options)
    except TypeError as error:
        raise ConfigError(f"weighting {name!r}: bad options {sorted(options)} ({error})") from None


register_weighting("fixed", FixedWeighting)
register_weighting("dynamic", DynamicWeighting)
register_weighting("dwa", DynamicWeightAverage)
register_weighting("uncertainty", UncertaintyWeighting)
register_weighting("gradnorm", GradNormWeighting)
register_weighting("rlw", RandomLossWeighting)
register_weighting("famo", FastAdaptiveWeighting)
register_weighting("gls", GeometricLossWeighting)
