"""Gradient surgery: combining the tasks' gradients other than by summing them.

With a loss weighting the update follows ``grad sum_k w_k L_k``, so where two tasks' gradients point
in conflicting directions on the shared parameters, the larger one wins and the other task is
pulled backwards (negative transfer). A surgery takes each task's own gradient of ``w_k L_k``,
flattened over all trainable parameters, ``(K, P)``, and returns the one gradient the optimizer
steps, ``(P,)``. It costs one backward pass per task instead of one in all.

New methods register with :func:`register_gradient_surgery`: a function, or a class whose
instances are called the same way and keep state from step to step (GradVac's targets; the trainer
saves its ``state_dict()`` with the training state). A class may set ``log_losses`` (the trainer then
hands it the gradients of ``w_k log L_k``, DB-MTL) and ``per_coordinate_state`` (its state follows
each coordinate, so ``gradient_surgery_scope: shared``, whose coordinates change from step to step,
is refused; ``shared_fixed`` keeps its first step's). An instance whose ``uses_layout`` is true is
called with a third argument, a :class:`GradientLayout` (the tasks' names in row order and how many
columns each parameter tensor has: MetaBalance, GradVac per layer), and one whose ``uses_losses`` is
true with a keyword argument ``losses``, the ``(K,)`` weighted losses ``w_k L_k`` (MoCo). A class may
also set ``needs_shared_scope`` (it is defined on the parameters the tasks share, MetaBalance) and a
``check_tasks(task_names)`` method the trainer calls once with the weighted tasks' names.
``TrainerConfig.gradient_surgery`` names one, and ``gradient_surgery_options`` its options. Each
surgery here is scaled so that where every task has the same gradient it returns their sum, the
gradient of ``sum_k w_k L_k`` (CAGrad: at ``alpha`` 0; DB-MTL: of ``sum_k w_k log L_k``), so
learning rates carry over from training without surgery; MoCo alone returns a weighted mean of the
gradients rescaled to the losses' sizes, as its authors' code does.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from mtlkit.configuration import check_non_negative, check_positive, check_probability
from mtlkit.errors import ConfigError

__all__ = ["pcgrad", "mgda", "cagrad", "aligned_mtl", "imtl", "nash_mtl", "fairgrad", "upgrad", "GradientVaccine",
           "DualBalancing", "MetaBalance", "MoCo", "GradientLayout", "register_gradient_surgery", "get_gradient_surgery",
           "build_gradient_surgery", "gradient_surgery_options", "refused_scopes", "list_gradient_surgeries"]

GradientSurgery = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def pcgrad(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad ("projecting conflicting gradients", Yu et al., NeurIPS 2020).

    Each task's gradient ``g_i``, wherever it conflicts with another task's original gradient
    ``g_j`` (``g_i . g_j < 0``), loses its component along ``g_j``; the other tasks are visited in
    a random order per task (drawn from ``generator``). The projected gradients are summed, so
    tasks that never conflict get exactly the summed gradient of ``sum_k w_k L_k``.

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    num_tasks = grads.shape[0]
    squared_norms = (grads * grads).sum(1)
    projected = grads.clone()
    for i in range(num_tasks):
        for j in torch.randperm(num_tasks, generator=generator).tolist():
            if j == i or squared_norms[j] == 0:
                continue
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= (dot / squared_norms[j]) * grads[j]
    return projected.sum(0)


def _simplex_minimiser(gram: np.ndarray, linear: np.ndarray, radius: float, max_iterations: int = 1000,
                       tolerance: float = 1e-8) -> np.ndarray:
    """The convex weights ``w`` (``w >= 0``, ``sum w = 1``) minimising ``w . linear + radius |g_w|``,
    with ``|g_w|^2 = w' gram w``: MGDA's least norm (``linear = 0``) and CAGrad's dual alike.

    Pairwise Frank-Wolfe: each step moves weight from the held task of steepest ascent to the task
    of steepest descent, by the exact minimiser along that segment (the objective is
    ``L s + radius sqrt(S + 2 P s + Q s^2)`` there, whose slope has a closed-form zero); it converges
    linearly on the simplex, where plain Frank-Wolfe crawls once three or more tasks share the
    optimum. Stops when the Frank-Wolfe gap, a bound on the distance to the optimum, is below
    ``tolerance`` times the objective's scale.
    """
    num_tasks = len(gram)
    weights = np.full(num_tasks, 1.0 / num_tasks)
    if num_tasks == 1 or not np.trace(gram) > 0:
        return weights
    for _ in range(max_iterations):
        toward = gram @ weights
        squared_norm = max(float(weights @ toward), 1e-300)
        norm = math.sqrt(squared_norm)
        gradient = linear + (radius / norm) * toward
        best = int(np.argmin(gradient))
        held = np.flatnonzero(weights > 0)
        worst = int(held[np.argmax(gradient[held])])
        gap = float(gradient @ weights) - gradient[best]
        if best == worst or gap <= tolerance * (abs(float(weights @ linear)) + radius * norm):
            break
        L = linear[best] - linear[worst]
        P = toward[best] - toward[worst]
        Q = gram[best, best] - 2 * gram[best, worst] + gram[worst, worst]
        if Q <= 0:
            break
        limit = weights[worst]
        at_limit = squared_norm + 2 * P * limit + Q * limit * limit
        if L + radius * (P + Q * limit) / math.sqrt(max(at_limit, 1e-300)) <= 0:
            step = limit  # still descending at the end of the segment
        else:
            # The slope's zero: radius (P + Q s) = -L sqrt(S + 2 P s + Q s^2), on the branch where
            # P + Q s has the sign of -L. D > 0 wherever the slope changes sign on the segment.
            D = radius * radius * Q - L * L
            step = (-P - L * math.sqrt(max(Q * squared_norm - P * P, 0.0) / D)) / Q if D > 0 else 0.0
            step = min(max(step, 0.0), limit)
        weights[best] += step
        weights[worst] -= step
        if weights[worst] < 1e-15:
            weights[worst] = 0.0
    return weights


def mgda(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MGDA (Sener & Koltun, NeurIPS 2018): the point of least norm in the convex hull of the tasks'
    gradients (found on their ``K x K`` Gram matrix): a direction along which no task's loss rises
    (``g_k . d >= |d|^2`` for every task at the optimum), or zero at a Pareto-stationary point. Times ``K``, so that tasks with the same
    gradient get their sum. ``generator`` is unused (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    weights = torch.from_numpy(_simplex_minimiser(gram, np.zeros(len(gram)), 1.0)).to(grads)
    return len(grads) * (weights @ grads)


def cagrad(grads: torch.Tensor, generator: torch.Generator, alpha: float = 0.5) -> torch.Tensor:
    """CAGrad ("conflict-averse gradient descent", Liu et al., NeurIPS 2021).

    Within a ball of radius ``alpha |g0|`` around the average gradient ``g0``, the direction that
    most improves the task that improves least: ``d = g0 + alpha |g0| g_w / |g_w|``, where the convex
    weights ``w`` minimise ``g_w . g0 + alpha |g0| |g_w|`` (solved on the ``K x K`` Gram matrix),
    divided by ``1 + alpha^2`` (the paper's rescaling). Times ``K``, so that ``alpha = 0`` is the
    summed gradient. ``generator`` is unused (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    check_non_negative(alpha, "training.gradient_surgery_options.alpha")
    num_tasks = len(grads)
    average = grads.mean(0)
    if alpha == 0:
        return num_tasks * average
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    radius = alpha * math.sqrt(max(float(gram.mean()), 0.0))  # alpha |g0|
    weights = torch.from_numpy(_simplex_minimiser(gram, gram.mean(1), radius)).to(grads)
    combined = weights @ grads
    norm = combined.norm()
    direction = average if norm == 0 else average + (radius / norm) * combined
    return num_tasks * direction / (1 + alpha**2)



def aligned_mtl(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Aligned-MTL (Senushkin et al., CVPR 2023): the tasks' gradients made orthogonal and of equal
    norm (a system of condition number 1, ``sqrt`` of the Gram matrix's smallest non-zero eigenvalue
    each) by ``B = sqrt(lambda_min) V Lambda^-1/2 V'`` from the Gram matrix ``V Lambda V'``, then summed:
    ``d = sum_i (sum_j B_ji) g_i``. Directions on which the tasks' gradients cancel are no longer
    dominated by the largest one. Tasks with the same gradient get their sum, unscaled. Eigenvalues
    below the Gram matrix's numerical rank are left out. ``generator`` is unused (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    gram = grads.double() @ grads.double().T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    tolerance = eigenvalues.max().clamp_min(0) * len(gram) * torch.finfo(torch.float64).eps
    kept = eigenvalues > tolerance
    if not bool(kept.any()):
        return grads.sum(0)  # every gradient zero
    eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
    balance = eigenvalues.min().sqrt() * (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.T
    return balance.sum(0).to(grads) @ grads


def imtl(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """IMTL-G (the gradient half of impartial multi-task learning, Liu et al., ICLR 2021): the mix
    ``d = sum_k alpha_k g_k`` with ``sum_k alpha_k = 1`` whose projections on every task's unit
    gradient ``u_k`` are equal, so each task's loss falls at the same rate along ``d``:
    ``alpha_{2..K} = g_1 U' (D U')^-1`` with rows ``D_k = g_1 - g_k`` and ``U_k = u_1 - u_k``
    (a pseudo-inverse where the gradients are linearly dependent). Times the number of tasks, so that
    tasks with the same gradient get their sum; tasks without gradient take no part (nor count). ``generator`` is unused
    (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    wide = grads.double()
    norms = wide.norm(dim=1)
    active = torch.nonzero(norms > 0).flatten()
    if len(active) == 0:
        return grads.sum(0)
    wide, units = wide[active], wide[active] / norms[active, None]
    differences, unit_differences = wide[:1] - wide[1:], units[:1] - units[1:]
    rest = torch.linalg.pinv(differences @ unit_differences.T).T @ (unit_differences @ wide[0])
    weights = torch.cat([1 - rest.sum(0, keepdim=True), rest])
    return (len(active) * (weights @ wide)).to(grads)


def _dual_cone_weights(gram: np.ndarray, max_sweeps: int = 1000, tolerance: float = 1e-10) -> np.ndarray:
    """For each task ``i`` the weights ``w_i`` of its gradient's projection ``G' w_i`` onto the dual
    cone of the gradients ``{v: G v >= 0}``: ``w_i = argmin w' (G G') w`` subject to ``w >= e_i``
    (``e_i`` the i-th unit vector; the dual of the projection), by exact coordinate descent on the
    box-constrained quadratic, all tasks at once. Returns them as rows, ``(K, K)``.
    """
    num_tasks = len(gram)
    lower = np.eye(num_tasks)
    weights = lower.copy()  # row i: w_i; exact where no gradient conflicts with another
    diagonal = np.diag(gram)
    if not (diagonal > 0).any():
        return weights
    scale = float(diagonal.max())
    for _ in range(max_sweeps):
        largest_change = 0.0
        for k in range(num_tasks):
            if diagonal[k] <= 0:
                continue  # a task without gradient: its weight changes nothing
            slope = weights @ gram[:, k]
            updated = np.maximum(lower[:, k], weights[:, k] - slope / diagonal[k])
            largest_change = max(largest_change, float(np.max(np.abs(updated - weights[:, k])) * diagonal[k]))
            weights[:, k] = updated
        if largest_change <= tolerance * scale:
            break
    return weights


def upgrad(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """UPGrad (Quinton & Rey, "Jacobian descent for multi-objective optimization", 2024): each task's
    gradient projected onto the dual cone of all the tasks' gradients (the closest vector along which
    no task's loss rises), then summed. Where no two gradients conflict that is their plain sum;
    otherwise every task's loss still does not rise to first order (``g_k . d >= 0``), and a task's
    share of the step grows with its own gradient, unlike MGDA's. The projections are solved on the
    ``K x K`` Gram matrix. ``generator`` is unused (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    return torch.from_numpy(_dual_cone_weights(gram).sum(0)).to(grads) @ grads


def _fair_share_weights(gram: np.ndarray, alpha: float = 1.0, ridge: float = 1e-12, max_iterations: int = 200) -> np.ndarray:
    """The positive ``w`` solving ``M w = w^(-1/alpha)`` (elementwise), ``M`` the Gram matrix over its
    Frobenius norm: the stationary point of the convex ``w' M w / 2 - sum U(w)`` with
    ``U'(w) = w^(-1/alpha)`` (``U = log`` at ``alpha`` 1, Nash bargaining), found by damped Newton
    steps. At ``alpha`` 1 the objective is self-concordant, so they converge from anywhere, and
    quadratically once close; for other ``alpha`` every step is line-searched.
    Tasks with no gradient get weight 0. Where some positive mix of the gradients is zero
    (Pareto-stationary) there is no solution; ``ridge`` on the diagonal bounds the weights there,
    and the mix they give stays (near) zero.
    """
    weights = np.zeros(len(gram))
    diagonal = np.diag(gram)
    active = np.flatnonzero(diagonal > diagonal.max(initial=0.0) * 1e-20)
    if not len(active):
        return weights
    matrix = gram[np.ix_(active, active)]
    matrix = matrix / np.linalg.norm(matrix) + ridge * np.eye(len(active))
    nash = alpha == 1
    power = 1.0 / alpha
    if nash:
        w = 1.0 / np.sqrt(np.diag(matrix))  # exact where the gradients are orthogonal

        def objective(a):
            return 0.5 * a @ matrix @ a - np.log(a).sum()

        def slope(a):
            return 1.0 / a

        def curvature(a):
            return 1.0 / a**2
    else:
        w = np.diag(matrix) ** (-1.0 / (1.0 + power))  # exact where the gradients are orthogonal

        def objective(a):
            return 0.5 * a @ matrix @ a - (a ** (1.0 - power)).sum() / (1.0 - power)

        def slope(a):
            return a ** -power

        def curvature(a):
            return power * a ** (-power - 1.0)

    value = objective(w)
    for _ in range(max_iterations):
        gradient = matrix @ w - slope(w)
        step = np.linalg.solve(matrix + np.diag(curvature(w)), -gradient)
        decrement = -gradient @ step  # the Newton decrement squared
        if nash and decrement < 0.1:
            # Within the region of quadratic convergence, and the full step keeps w > 0 (the Hessian
            # holds diag(1 / w^2), so |step_k| / w_k <= sqrt(decrement)); a line search there would
            # only see the objective's rounding.
            w = w + step
            if decrement < 1e-16:
                break
            value = objective(w)
            continue
        if decrement < 1e-16 * max(1.0, abs(value)):
            break
        shrinking = step < 0
        size = min(1.0, 0.99 * float(np.min(-w[shrinking] / step[shrinking]))) if shrinking.any() else 1.0
        while True:  # backtracking (Armijo) line search, staying inside w > 0
            candidate = w + size * step
            new_value = objective(candidate)
            if new_value <= value - 0.25 * size * decrement or size < 1e-12:
                break
            size *= 0.5
        w, value = candidate, new_value
    weights[active] = w
    return weights


def nash_mtl(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Nash-MTL (Navon et al., ICML 2022): the tasks bargain over the update direction ``d``; the
    Nash bargaining solution maximises ``sum_k log(g_k . d)``, so every task gains, and scaling one
    task's loss does not change the direction (each ``alpha_k`` scales inversely). It is
    ``d = sum_k alpha_k g_k`` with ``(G G' / N) alpha = 1 / alpha`` (``N``, the Frobenius norm of the
    Gram matrix ``G G'``, by which the reference implementation normalises it), solved exactly on the
    ``K x K`` Gram matrix where the paper approximates it by a few convex-concave steps. Then
    ``|d|^2 = K N``, and tasks with the same gradient get their sum. ``generator`` is unused
    (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    return torch.from_numpy(_fair_share_weights(gram)).to(grads) @ grads


def fairgrad(grads: torch.Tensor, generator: torch.Generator, alpha: float = 1.0) -> torch.Tensor:
    """FairGrad (Ban & Ji, "Fair resource allocation in multi-task learning", ICML 2024): the update
    shares out the loss decrease among the tasks as an ``alpha``-fair allocation, maximising
    ``sum_k (g_k . d)^(1 - alpha) / (1 - alpha)`` (``sum_k log(g_k . d)`` at ``alpha`` 1). It is
    ``d = sum_k w_k g_k`` with ``(G G' / N) w = w^(-1/alpha)``, so each task's gain is
    ``g_k . d = N w_k^(-1/alpha) > 0``. ``alpha`` 1 (LibMTL's default) is proportional fairness, Nash-MTL's
    direction (:func:`nash_mtl`, the same numbers); 2, minimum potential delay; larger ``alpha``
    evens the gains out further, towards max-min fairness; towards 0 the larger gradients get more
    (utilitarian). ``N`` is the Gram matrix's Frobenius norm (where LibMTL leaves it out; it changes
    the step's length, not its direction), so tasks with the same gradient get their sum. Solved
    exactly by damped Newton steps on the ``K x K`` Gram matrix, where the paper runs scipy's
    least squares. ``generator`` is unused (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    check_positive(alpha, "training.gradient_surgery_options.alpha")
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    return torch.from_numpy(_fair_share_weights(gram, float(alpha))).to(grads) @ grads


@dataclass(frozen=True)
class GradientLayout:
    """What the rows and columns of a surgery's ``grads`` ``(K, P)`` are, for a surgery that sets
    ``uses_layout``: ``task_names``, the ``K`` tasks in row order, and ``segment_sizes``, one count per
    trainable parameter tensor in ``model.parameters()`` order, of the columns that are its coordinates
    (summing to ``P``; under ``gradient_surgery_scope: shared`` or ``shared_fixed`` only its shared
    coordinates, 0 where it has none)."""

    task_names: tuple[str, ...]
    segment_sizes: tuple[int, ...]

    def column_layers(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The parameter tensor (layer) each column belongs to. Shape: ``(P,)`` int64."""
        sizes = torch.tensor(self.segment_sizes, device=device)
        return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)

    def layer_sums(self, values: torch.Tensor, column_layers: torch.Tensor) -> torch.Tensor:
        """``values`` summed over each layer's columns, in float64. Shape: ``(..., P)`` -> ``(..., layers)``."""
        sums = torch.zeros(*values.shape[:-1], len(self.segment_sizes), dtype=torch.float64, device=values.device)
        return sums.index_add_(-1, column_layers, values.double())


class GradientVaccine:
    """GradVac ("gradient vaccine", Wang et al., ICLR 2021): PCGrad with a learned target. For each
    pair of tasks an exponential moving average (rate ``beta``) of their gradients' cosine
    similarity is kept; where task ``i``'s gradient (as adjusted so far) has a lower cosine with task
    ``j``'s than that target, a multiple of ``g_j`` is added to it to bring the cosine exactly to the
    target, so tasks that usually agree are kept agreeing, not only kept from conflicting (PCGrad's
    target is always 0). The other tasks are visited in a random order per task (drawn from
    ``generator``); the adjusted gradients are summed. Targets start at 0. By default they cover the
    whole model; with ``per_layer`` each parameter tensor has its own targets and its own
    adjustment (the paper's finer granularity: layers that agree are left alone where another
    conflicts), for which the trainer hands it a :class:`GradientLayout`.

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``. ``state_dict()`` holds the ``(K, K)`` targets
    (``(K, K, layers)`` with ``per_layer``).
    """

    def __init__(self, beta: float = 0.01, per_layer: bool = False):
        self.beta = check_probability(beta, "training.gradient_surgery_options.beta")
        if not isinstance(per_layer, bool):
            raise ConfigError(f"training.gradient_surgery_options.per_layer: expected true or false, got {per_layer!r}")
        self.uses_layout = per_layer
        self.targets: torch.Tensor | None = None

    def __call__(self, grads: torch.Tensor, generator: torch.Generator, layout: GradientLayout | None = None) -> torch.Tensor:
        if self.uses_layout:
            if layout is None:
                raise ValueError("gradvac with per_layer needs the gradients' layout (the trainer hands it)")
            return self._per_layer(grads, generator, layout)
        num_tasks = grads.shape[0]
        if self.targets is None:
            self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        elif len(self.targets) != num_tasks:
            raise RuntimeError(f"gradvac: its targets are for {len(self.targets)} tasks, but {num_tasks} gradients came; "
                               "the tasks with a non-zero weight must stay the same through training")
        norms = grads.norm(dim=1)
        adjusted = grads.clone()
        for i in range(num_tasks):
            for j in torch.randperm(num_tasks, generator=generator).tolist():
                own_norm = adjusted[i].norm()
                if j == i or norms[j] == 0 or own_norm == 0:
                    continue
                cosine = float(torch.dot(adjusted[i], grads[j]) / (own_norm * norms[j]))
                target = float(self.targets[i, j])
                if cosine < target < 1:
                    # The multiple of g_j that turns the angle to g_j into the target's (the paper's eq. 5).
                    scale = own_norm * (target * math.sqrt(max(1 - cosine**2, 0.0)) - cosine * math.sqrt(1 - target**2))
                    adjusted[i] += (scale / (norms[j] * math.sqrt(1 - target**2))) * grads[j]
                self.targets[i, j] = (1 - self.beta) * target + self.beta * cosine
        return adjusted.sum(0)

    def _per_layer(self, grads: torch.Tensor, generator: torch.Generator, layout: GradientLayout) -> torch.Tensor:
        """The same visits and adjustments, every layer on its own (all layers at once, in float64)."""
        num_tasks, layers = grads.shape[0], len(layout.segment_sizes)
        layer_of = layout.column_layers(grads.device)

        def layer_sums(values: torch.Tensor) -> torch.Tensor:
            return layout.layer_sums(values, layer_of)

        if self.targets is None:
            self.targets = torch.zeros(num_tasks, num_tasks, layers, dtype=torch.float64)
        elif self.targets.shape[0] != num_tasks or self.targets.shape[2:] != (layers,):
            raise RuntimeError(f"gradvac: its targets are for {self.targets.shape[0]} tasks and layers "
                               f"{tuple(self.targets.shape[2:])}, but gradients of {num_tasks} tasks and {layers} "
                               "layers came; the weighted tasks and the parameters must stay the same")
        tiny = torch.finfo(torch.float64).tiny
        norms = layer_sums(grads.square()).sqrt()
        adjusted = grads.clone()
        for i in range(num_tasks):
            for j in torch.randperm(num_tasks, generator=generator).tolist():
                if j == i:
                    continue
                own = layer_sums(adjusted[i].square()).sqrt()
                reached = (own > 0) & (norms[j] > 0)
                cosine = torch.where(reached, layer_sums(adjusted[i] * grads[j]) / (own * norms[j]).clamp_min(tiny), 0.0)
                target = self.targets[i, j].to(cosine.device)
                root = (1 - target.square()).clamp_min(tiny).sqrt()
                scale = own * (target * (1 - cosine.square()).clamp_min(0).sqrt() - cosine * root) / (norms[j] * root).clamp_min(tiny)
                scale = torch.where(reached & (cosine < target) & (target < 1), scale, 0.0)
                adjusted[i] += scale.to(grads.dtype)[layer_of] * grads[j]
                self.targets[i, j] = torch.where(reached, (1 - self.beta) * target + self.beta * cosine, target).cpu()
        return adjusted.sum(0)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": None if self.targets is None else self.targets.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.targets = None if state["targets"] is None else state["targets"].clone()


class DualBalancing:
    """DB-MTL (dual-balancing multi-task learning, Lin et al. 2023): the loss scales balanced by taking
    each task's gradient of ``w_k log L_k`` (``log_losses``: the trainer differentiates log losses for
    this surgery, so a task's loss scale no longer sets its gradient's), and the gradient magnitudes
    balanced by rescaling each task's moving average of those gradients to the largest one's norm:
    ``m_k <- g_k + r (m_k - g_k)`` with ``r = beta / step**beta_sigma``, then
    ``sum_k (max_j |m_j| / |m_k|) m_k``. Where every task has the same gradient, the averages meet at
    it and this is their sum.

    The paper tunes ``beta`` and ``beta_sigma`` per data set; the defaults, 0.9 and 0.5 (an average
    that fades out as ``1 / sqrt(step)``), trained the MMoE paper's synthetic tasks best of the values
    tried here. LibMTL's default ``beta_sigma`` 0 keeps a constant average, which stacked on Adam's own
    moment reached 1.9-3.8 times plain training's MSE there (README, "Models").

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``. ``state_dict()`` holds the ``(K, P)`` averages and the
    step count; the averages are per coordinate, so the set of coordinates must stay the same
    (``gradient_surgery_scope: all``, or ``shared_fixed`` for the shared parameters alone, as the paper
    and LibMTL apply it).
    """

    log_losses = True
    per_coordinate_state = True

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5):
        self.beta = check_probability(beta, "training.gradient_surgery_options.beta")
        self.beta_sigma = check_non_negative(beta_sigma, "training.gradient_surgery_options.beta_sigma")
        self.averages: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.averages is None:
            self.averages = torch.zeros_like(grads)
        elif self.averages.shape != grads.shape:
            raise RuntimeError(f"db_mtl: its moving averages are {tuple(self.averages.shape)} (tasks, coordinates), but "
                               f"gradients of {tuple(grads.shape)} came; the weighted tasks and the parameters must stay the same")
        self.steps += 1
        rate = self.beta / self.steps**self.beta_sigma
        self.averages = torch.lerp(grads, self.averages.to(grads), rate)
        norms = self.averages.norm(dim=1)
        scales = torch.where(norms > 0, norms.max() / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        return scales @ self.averages

    def state_dict(self) -> dict[str, Any]:
        return {"averages": None if self.averages is None else self.averages.clone(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averages = None if state["averages"] is None else state["averages"].clone()
        self.steps = int(state["steps"])


class MetaBalance:
    """MetaBalance (He et al., "Improving multi-task recommendations via adapting gradient magnitudes
    of auxiliary tasks", WWW 2022): one main task and auxiliary tasks that are there only to help it.
    On every shared parameter tensor (a layer), each task's gradient norm is averaged over steps
    (``m_k <- beta m_k + (1 - beta) |g_k|``), and each auxiliary gradient is brought towards the main
    one's size: ``g_k <- (relax_factor m_main / m_k + 1 - relax_factor) g_k``, so an auxiliary task can
    neither swamp the main task's gradient nor be too small to help (the paper's strategy C). The main
    gradient is kept; the adjusted gradients are summed, so tasks with the same gradient get their sum.
    A layer the main task does not reach keeps the auxiliary gradients as they are. The defaults,
    ``relax_factor`` 0.7 and ``beta`` 0.9, are the paper's code's.

    It is defined on the shared layers (the task-specific ones take their own task's gradient), so it
    needs ``gradient_surgery_scope: shared``. ``generator`` is unused (deterministic).

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``. ``state_dict()`` holds the ``(K, layers)`` averages.
    """

    uses_layout = True
    needs_shared_scope = True

    def __init__(self, main_task: str, relax_factor: float = 0.7, beta: float = 0.9):
        if not isinstance(main_task, str) or not main_task:
            raise ConfigError(f"training.gradient_surgery_options.main_task: metabalance needs the name of the task the "
                              f"others are auxiliary to, got {main_task!r}")
        if not (isinstance(relax_factor, (int, float)) and not isinstance(relax_factor, bool) and 0 <= relax_factor <= 1):
            raise ConfigError(f"training.gradient_surgery_options.relax_factor: expected a number in [0, 1], got {relax_factor!r}")
        self.main_task = main_task
        self.relax_factor = float(relax_factor)
        self.beta = check_probability(beta, "training.gradient_surgery_options.beta")
        self.averages: torch.Tensor | None = None

    def check_tasks(self, task_names: tuple[str, ...]) -> None:
        """Refuse a ``main_task`` that is not among the weighted tasks."""
        if self.main_task not in task_names:
            raise ConfigError(f"training.gradient_surgery_options.main_task: {self.main_task!r} is not a task with a "
                              f"non-zero weight; expected one of {list(task_names)}")

    def __call__(self, grads: torch.Tensor, generator: torch.Generator, layout: GradientLayout) -> torch.Tensor:
        self.check_tasks(layout.task_names)
        main = layout.task_names.index(self.main_task)
        layer_of = layout.column_layers(grads.device)
        norms = layout.layer_sums(grads.double().square(), layer_of).sqrt()
        if self.averages is None:
            self.averages = torch.zeros_like(norms)
        elif self.averages.shape != norms.shape:
            raise RuntimeError(f"metabalance: its averages are {tuple(self.averages.shape)} (tasks, layers), but gradients "
                               f"for {tuple(norms.shape)} came; the weighted tasks and the parameters must stay the same")
        self.averages = torch.lerp(norms, self.averages.to(norms), self.beta)
        main_average = self.averages[main]
        reached = (self.averages > 0) & (main_average > 0)
        ratios = torch.where(reached, main_average / self.averages.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
        scales = self.relax_factor * ratios + (1 - self.relax_factor)
        scales[main] = 1.0
        return torch.einsum("kp,kp->p", scales.to(grads.dtype)[:, layer_of], grads)

    def state_dict(self) -> dict[str, Any]:
        return {"averages": None if self.averages is None else self.averages.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averages = None if state["averages"] is None else state["averages"].clone()


class MoCo:
    """MoCo (Fernando et al., "Mitigating gradient bias in multi-objective learning", ICLR 2023): MGDA's
    min-norm weighting made stable under minibatch noise by tracking each task's gradient and letting
    the weights move a little every step instead of solving for them afresh. As in the authors' code
    (and LibMTL's), each task's gradient is first rescaled to its loss's size, ``g_k |g_k|^-1 L_k``
    (``L_k`` the weighted loss ``w_k L_k``, which the trainer hands it: ``uses_losses``), then at step
    ``t``:

    - tracking: ``y_k <- y_k - beta t^-beta_sigma (y_k - g_k)``;
    - weights: ``lambda <- softmax(lambda - gamma t^-gamma_sigma (Y Y' + rho I) lambda)``, from
      ``lambda = 1 / K``;
    - direction: ``Y' lambda``.

    The defaults (``beta`` 0.5, ``beta_sigma`` 0.5, ``gamma`` 0.1, ``gamma_sigma`` 0.5, ``rho`` 0) are
    LibMTL's. The weights sum to 1, so unlike the other surgeries the step is a weighted mean, of the
    size of the losses, not the summed gradient: Adam, the trainer's optimizer, hardly depends on the
    gradient's scale, but a learning rate tuned for plain SGD does not carry over.
    ``generator`` is unused (deterministic).

    Shape: ``grads`` ``(K, P)``, ``losses`` ``(K,)`` -> ``(P,)``. ``state_dict()`` holds the ``(K, P)``
    tracked gradients, the ``(K,)`` weights and the step count; the tracking is per coordinate, so
    the coordinates must stay the same (``gradient_surgery_scope: all``, or ``shared_fixed`` for the
    shared parameters alone, as LibMTL applies it).
    """

    uses_losses = True
    per_coordinate_state = True

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
                 rho: float = 0.0):
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta <= 1):
            raise ConfigError(f"training.gradient_surgery_options.beta: expected a number in (0, 1], got {beta!r}")
        self.beta = float(beta)
        self.beta_sigma = check_non_negative(beta_sigma, "training.gradient_surgery_options.beta_sigma")
        self.gamma = check_positive(gamma, "training.gradient_surgery_options.gamma")
        self.gamma_sigma = check_non_negative(gamma_sigma, "training.gradient_surgery_options.gamma_sigma")
        self.rho = check_non_negative(rho, "training.gradient_surgery_options.rho")
        self.tracked: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, grads: torch.Tensor, generator: torch.Generator, *, losses: torch.Tensor) -> torch.Tensor:
        num_tasks = grads.shape[0]
        if self.tracked is None:
            self.tracked = torch.zeros_like(grads)
            self.weights = torch.full((num_tasks,), 1.0 / num_tasks, dtype=grads.dtype, device=grads.device)
        elif self.tracked.shape != grads.shape:
            raise RuntimeError(f"moco: its tracked gradients are {tuple(self.tracked.shape)} (tasks, coordinates), but "
                               f"gradients of {tuple(grads.shape)} came; the weighted tasks and the parameters must stay the same")
        self.steps += 1
        # The reference's 1e-8 keeps a task without labelled rows (gradient 0) at 0.
        rescaled = grads / (grads.norm(dim=1, keepdim=True) + 1e-8) * losses.to(grads).reshape(-1, 1)
        tracked = self.tracked.to(grads)
        tracked = tracked - self.beta / self.steps**self.beta_sigma * (tracked - rescaled)
        gram = tracked @ tracked.T + self.rho * torch.eye(num_tasks, dtype=grads.dtype, device=grads.device)
        weights = self.weights.to(grads)
        weights = torch.softmax(weights - self.gamma / self.steps**self.gamma_sigma * (gram @ weights), dim=0)
        self.tracked, self.weights = tracked, weights
        return weights @ tracked

    def state_dict(self) -> dict[str, Any]:
        return {"tracked": None if self.tracked is None else self.tracked.clone(),
                "weights": None if self.weights is None else self.weights.clone(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracked = None if state["tracked"] is None else state["tracked"].clone()
        self.weights = None if state["weights"] is None else state["weights"].clone()
        self.steps = int(state["steps"])


_SURGERIES: dict[str, GradientSurgery | type] = {"pcgrad": pcgrad, "mgda": mgda, "cagrad": cagrad, "aligned_mtl": aligned_mtl,
                                                 "imtl": imtl, "nash_mtl": nash_mtl, "fairgrad": fairgrad, "upgrad": upgrad,
                                                 "gradvac": GradientVaccine, "db_mtl": DualBalancing, "metabalance": MetaBalance,
                                                 "moco": MoCo}


def register_gradient_surgery(name: str, surgery: GradientSurgery | type) -> None:
    """Make ``surgery`` available as ``gradient_surgery: name``: a function ``(grads (K, P), generator) -> (P,)``
    taking its options as keywords after those two, or a class built from the options whose instances
    are such functions and keep state between steps (with ``state_dict``/``load_state_dict``, saved
    with the training state)."""
    if name in _SURGERIES:
        raise ValueError(f"gradient surgery {name!r} is already registered")
    _SURGERIES[name] = surgery


def get_gradient_surgery(name: str) -> GradientSurgery | type:
    """The registered surgery called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    try:
        return _SURGERIES[name]
    except KeyError:
        raise ConfigError(f"training.gradient_surgery: unknown {name!r}; expected one of {sorted(_SURGERIES)} or null") from None


def build_gradient_surgery(name: str, options: Mapping[str, Any] | None = None) -> GradientSurgery:
    """The surgery ``name`` with its keyword ``options`` bound (CAGrad's ``alpha``), or, for a class,
    a new instance built from them (GradVac's ``beta``). An unknown option, or a value the surgery
    rejects on a trial call with two orthogonal gradients, is a :class:`ConfigError` naming it."""
    surgery = get_gradient_surgery(name)
    if not isinstance(options, Mapping | None):
        raise ConfigError(f"training.gradient_surgery_options: expected a mapping of option names to values, got {options!r}")
    options = dict(options or {})
    accepted = gradient_surgery_options(name)
    allowed = list(accepted)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"training.gradient_surgery_options: unknown {unknown} for {name!r}; allowed: {allowed}")
    missing = [option for option, default in accepted.items() if default is inspect.Parameter.empty and option not in options]
    if missing:
        raise ConfigError(f"training.gradient_surgery_options: {name!r} needs {missing}")
    if inspect.isclass(surgery):
        trial = surgery(**options)  # a throwaway instance: the trial leaves no state
        if not getattr(trial, "uses_layout", False):  # one that does needs the tasks' names; its __init__ checks its options
            losses = {"losses": torch.ones(2)} if getattr(trial, "uses_losses", False) else {}
            trial(torch.eye(2), torch.Generator().manual_seed(0), **losses)
        return surgery(**options)
    bound = functools.partial(surgery, **options) if options else surgery
    bound(torch.eye(2), torch.Generator().manual_seed(0))
    return bound


def gradient_surgery_options(name: str) -> dict[str, Any]:
    """The options the surgery ``name`` takes, each with its default (``inspect.Parameter.empty``
    for one it needs)."""
    surgery = get_gradient_surgery(name)
    parameters = list(inspect.signature(surgery).parameters.values())[0 if inspect.isclass(surgery) else 2:]
    return {p.name: p.default for p in parameters}


def refused_scopes(surgery: object) -> dict[str, str]:
    """The ``gradient_surgery_scope`` values ``surgery`` (registered, or an instance) refuses, each with why."""
    refused = {}
    if getattr(surgery, "per_coordinate_state", False):
        refused["shared"] = ("keeps a moving average per coordinate, and scope 'shared' chooses its coordinates afresh every "
                             "step; use 'shared_fixed' (the shared coordinates of the first step, for the whole run) or 'all'")
    if getattr(surgery, "needs_shared_scope", False):
        refused["all"] = ("adjusts the tasks' gradients on the layers they share, and leaves each task's own layers its own "
                          "gradient; set gradient_surgery_scope: shared (or shared_fixed)")
    return refused


def list_gradient_surgeries() -> list[str]:
    """Names of the registered gradient surgeries."""
    return sorted(_SURGERIES)
