"""Gradient surgeries (PCGrad, MGDA, CAGrad, Aligned-MTL, IMTL-G, Nash-MTL, FairGrad, UPGrad, GradVac, DB-MTL, MetaBalance),
alone and in the trainer."""

import contextlib
import math

import numpy as np
import pytest
import torch

from mtlkit import ConfigError, TaskSpec
from mtlkit.data import MultiTaskTensors
from mtlkit.models import build_model
from mtlkit.objectives import (DualBalancing, GradientLayout, GradientVaccine, MetaBalance, MoCo, aligned_mtl, build_gradient_surgery,
                               cagrad, fairgrad, imtl, list_gradient_surgeries, mgda, nash_mtl, pcgrad, upgrad)
from mtlkit.objectives.gradient_surgery import _dual_cone_weights, _fair_share_weights, _simplex_minimiser
from mtlkit.training import Trainer, TrainerConfig, evaluate

from in_process import run_example


def test_pcgrad_projects_conflicting_gradients_only():
    generator = torch.Generator().manual_seed(0)
    # g1 . g2 = -1: each loses its component along the other, and neither conflicts any more.
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(pcgrad(grads, generator), torch.tensor([0.5 + 0.0, 0.5 + 1.0]))
    first, second = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])  # the projections, by hand
    assert torch.dot(first, grads[1]) == 0 and torch.dot(second, grads[0]) == 0
    # No conflict: the plain sum, bit for bit; a task without gradient changes nothing and makes no NaN.
    agreeing = torch.randn(3, 50, generator=generator).abs()
    assert torch.equal(pcgrad(agreeing, generator), agreeing.clone().sum(0))
    with_zero = torch.cat([grads, torch.zeros(1, 2)])
    torch.testing.assert_close(pcgrad(with_zero, generator), torch.tensor([0.5, 1.5]))


def test_pcgrad_with_two_tasks_never_opposes_either():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = torch.randn(2, 30, generator=generator, dtype=torch.double)
        combined = pcgrad(grads, generator)
        assert (grads @ combined >= -1e-12).all()
    three = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pcgrad(three, torch.Generator().manual_seed(5)), pcgrad(three, torch.Generator().manual_seed(5)))


def _data(second_label_sign: float):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    return MultiTaskTensors(x, torch.cat([y, second_label_sign * y], 1), ["a", "b"])


TASKS = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]


@pytest.mark.parametrize("model_name", ["shared_bottom", "mmoe", "ple"])
def test_a_surgery_that_sums_trains_exactly_as_the_weighted_sum(model_name, monkeypatch):
    """The per-task gradients, flattened and written back, are the plain backward's pieces: summing
    them (task weights 2 and 0.5 applied) trains the same parameters as ``total.backward()``."""
    tasks = [TaskSpec("a", "regression", weight=2.0), TaskSpec("b", "regression", weight=0.5)]
    trained = []
    for surgery in (None, "sum"):
        torch.manual_seed(0)
        model = build_model(model_name, input_dim=8, tasks=tasks)
        trainer = Trainer(model, TrainerConfig(max_steps=15, batch_size=100, progress=False,
                                               gradient_surgery=None if surgery is None else "pcgrad"))
        if surgery:
            monkeypatch.setattr(trainer, "_surgery", lambda grads, generator: grads.sum(0))
        trainer.fit(_data(-1.0))
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(trained[1], trained[0], atol=1e-6, rtol=1e-5)


def test_the_trainer_steps_pcgrad_of_each_tasks_own_gradient():
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=TASKS)
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=100, progress=False, gradient_surgery="pcgrad"))
    batch = next(iter(_data(-1.0).batches(100)))
    _, losses = trainer.batch_objective(batch)
    parameters = list(model.parameters())
    own = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t.name], parameters, retain_graph=True)])
                       for t in TASKS])
    expected = pcgrad(own, torch.Generator().manual_seed(trainer.config.seed))
    trainer._surgery_backward(losses)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in parameters]), expected)
    assert (own @ expected >= -1e-6).all()


@pytest.mark.parametrize("scope", ["shared", "shared_fixed"])
@pytest.mark.parametrize("model_name, shared_parts", [("mmoe", ["experts"]), ("omoe", ["experts", "gates"]),
                                                     ("shared_bottom", ["bottom"])])
def test_a_shared_scope_leaves_each_tasks_own_coordinates_to_its_own_gradient(model_name, shared_parts, scope, monkeypatch):
    """``gradient_surgery_scope: shared`` (and ``shared_fixed``'s first step): the surgery sees only the
    coordinates both tasks' gradients reach (experts, bottoms, OMoE's one gate); the towers' slices
    and MMoE's per-task gates take the plain sum, which there is the one task's own gradient."""
    torch.manual_seed(0)
    model = build_model(model_name, input_dim=8, tasks=TASKS)
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=100, progress=False, gradient_surgery="pcgrad",
                                           gradient_surgery_scope=scope))
    seen = []
    monkeypatch.setattr(trainer, "_surgery", lambda grads, generator: seen.append(grads) or torch.zeros(grads.shape[1]))
    batch = next(iter(_data(-1.0).batches(100)))
    _, losses = trainer.batch_objective(batch)
    named = dict(model.named_parameters())
    own = [torch.autograd.grad(losses[t.name], list(named.values()), retain_graph=True, allow_unused=True) for t in TASKS]
    trainer._surgery_backward(losses)
    shared_count = 0
    for (name, parameter), first, second in zip(named.items(), *own):
        first = torch.zeros_like(parameter) if first is None else first
        second = torch.zeros_like(parameter) if second is None else second
        both = (first != 0) & (second != 0)
        torch.testing.assert_close(parameter.grad, torch.where(both, 0.0, first + second))  # the surgery returned zeros
        shared_count += int(both.sum())
        if name.split(".")[0] in shared_parts:
            assert both.float().mean() > 0.9, name  # shared layers: nearly every coordinate reached by both
        else:
            assert not both.any(), name  # towers, MMoE's gates: one task's coordinates
    assert len(seen) == 1 and seen[0].shape == (2, shared_count)


@pytest.mark.parametrize("scope, second_step_sees", [("shared", [1, 2]), ("shared_fixed", [0, 1])])
def test_shared_fixed_keeps_the_first_steps_shared_coordinates(scope, second_step_sees, monkeypatch):
    """``shared`` chooses the coordinates two tasks reach afresh every step; ``shared_fixed`` keeps the
    first step's, so a surgery's per-coordinate state always lines up, and a coordinate outside them
    takes the plain sum even in a step where both tasks reach it."""
    trainer = Trainer(build_model("mmoe", input_dim=8, tasks=TASKS),
                      TrainerConfig(max_steps=1, progress=False, gradient_surgery="pcgrad", gradient_surgery_scope=scope))
    seen = []
    monkeypatch.setattr(trainer, "_surgery", lambda grads, generator: seen.append(grads) or torch.zeros(grads.shape[1]))
    first = torch.tensor([[1.0, 2.0, 0.0, 3.0], [4.0, 5.0, 0.0, 0.0]])  # both tasks reach coordinates 0 and 1
    second = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 3.0, 4.0, 5.0]])  # ... then 1 and 2
    torch.testing.assert_close(trainer._combine_task_gradients(first, ("a", "b"), [4], None), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    combined = trainer._combine_task_gradients(second, ("a", "b"), [4], None)
    torch.testing.assert_close(seen[1], second[:, second_step_sees])
    expected = second.sum(0)
    expected[second_step_sees] = 0.0
    torch.testing.assert_close(combined, expected)
    with pytest.raises(RuntimeError, match="chosen among 4 parameter coordinates, but gradients over 5 came") if scope == "shared_fixed" \
            else contextlib.nullcontext():
        trainer._combine_task_gradients(torch.ones(2, 5), ("a", "b"), [5], None)


@pytest.mark.parametrize("surgery", ["db_mtl", "moco"])
def test_per_coordinate_surgeries_run_on_the_shared_parameters_alone_with_shared_fixed(surgery):
    """DB-MTL and MoCo keep state per coordinate, so ``shared`` is refused; ``shared_fixed`` restricts
    them to the experts, as the paper's code (LibMTL) applies them, and each task's own tower and gate
    take its own gradient: a tower slice moves exactly as without the surgery's rescaling."""
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=TASKS)
    trainer = Trainer(model, TrainerConfig(max_steps=4, batch_size=100, progress=False, gradient_surgery=surgery,
                                           gradient_surgery_scope="shared_fixed"))
    trainer.fit(_data(-1.0))
    state = trainer._surgery.state_dict()
    tracked = state["averages"] if surgery == "db_mtl" else state["tracked"]
    shared = trainer._fixed_shared_coordinates
    experts = sum(p.numel() for name, p in model.named_parameters() if name.startswith("experts"))
    assert tracked.shape == (2, int(shared.sum())) and experts * 0.9 < int(shared.sum()) <= experts


def test_tasks_of_weight_zero_take_no_backward_pass(monkeypatch):
    """A weight-0 task (ESMM's CVR) has no gradient to project; with every weight 0 nothing moves."""
    tasks = [TaskSpec("a", "regression", weight=0.0), TaskSpec("b", "regression", weight=0.0)]
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=tasks)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    trainer = Trainer(model, TrainerConfig(max_steps=3, batch_size=100, progress=False, gradient_surgery="pcgrad"))
    monkeypatch.setattr(trainer, "_surgery", lambda grads, generator: calls.append(grads) or grads.sum(0))
    trainer.fit(_data(1.0))
    assert calls == [] and all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("options, message", [
    (dict(gradient_surgery="graddrop"),
     r"gradient_surgery.*'graddrop'.*\['aligned_mtl', 'cagrad', 'db_mtl', 'fairgrad', 'gradvac', 'imtl', 'metabalance', 'mgda', "
     r"'moco', 'nash_mtl', 'pcgrad', 'upgrad'\]"),
    (dict(gradient_surgery="fairgrad", gradient_surgery_options={"alpha": 0}), "options.alpha: expected a number > 0, got 0"),
    (dict(gradient_surgery="pcgrad", weighting="gradnorm"), "'gradnorm' learns its weights from the tasks' gradients"),
    (dict(gradient_surgery="db_mtl", weighting="uncertainty"), "'db_mtl' balances the losses' scales itself"),
    (dict(gradient_surgery="cagrad", gradient_surgery_options={"c": 0.5}), r"unknown \['c'\] for 'cagrad'; allowed: \['alpha'\]"),
    (dict(gradient_surgery="cagrad", gradient_surgery_options={"alpha": -0.1}), "alpha: expected a number >= 0"),
    (dict(gradient_surgery="cagrad", gradient_surgery_options=[0.5]), "expected a mapping"),
    (dict(gradient_surgery_options={"alpha": 0.5}), "without a gradient_surgery"),
    (dict(gradient_surgery="gradvac", gradient_surgery_options={"alpha": 0.5}),
     r"unknown \['alpha'\] for 'gradvac'; allowed: \['beta', 'per_layer'\]"),
    (dict(gradient_surgery="gradvac", gradient_surgery_options={"beta": 1.5}), r"options.beta: expected a number in \[0, 1\)"),
    (dict(gradient_surgery="nash_mtl", gradient_surgery_options={"beta": 0.5}), r"unknown \['beta'\] for 'nash_mtl'; allowed: \[\]"),
    (dict(gradient_surgery="pcgrad", gradient_surgery_scope="towers"),
     r"gradient_surgery_scope: expected one of \['all', 'shared', 'shared_fixed'\]"),
    (dict(gradient_surgery_scope="shared"), "gradient_surgery_scope: 'shared' given without a gradient_surgery"),
    (dict(gradient_surgery="db_mtl", gradient_surgery_options={"beta": 1.0}), r"options.beta: expected a number in \[0, 1\)"),
    (dict(gradient_surgery="db_mtl", gradient_surgery_options={"beta_sigma": -1}), "options.beta_sigma: expected a number >= 0"),
    (dict(gradient_surgery="db_mtl", gradient_surgery_scope="shared"), "'db_mtl' keeps a moving average per coordinate"),
    (dict(gradient_surgery="metabalance", gradient_surgery_scope="shared"),
     r"gradient_surgery_options: 'metabalance' needs \['main_task'\]"),
    (dict(gradient_surgery="metabalance", gradient_surgery_scope="shared", gradient_surgery_options={"main_task": 3}),
     "options.main_task: metabalance needs the name of the task the others are auxiliary to, got 3"),
    (dict(gradient_surgery="metabalance", gradient_surgery_options={"main_task": "a"}), "set gradient_surgery_scope: shared"),
    (dict(gradient_surgery="metabalance", gradient_surgery_options={"main_task": "c"}, gradient_surgery_scope="shared"),
     r"main_task: 'c' is not a task with a non-zero weight; expected one of \['a', 'b'\]"),
    (dict(gradient_surgery="metabalance", gradient_surgery_options={"main_task": "a", "relax_factor": 1.5},
          gradient_surgery_scope="shared"),
     r"options.relax_factor: expected a number in \[0, 1\], got 1.5"),
    (dict(gradient_surgery="metabalance", gradient_surgery_options={"main_task": "a", "beta": 1}, gradient_surgery_scope="shared"),
     r"options.beta: expected a number in \[0, 1\)"),
    (dict(gradient_surgery="moco", gradient_surgery_options={"beta": 0}), r"options.beta: expected a number in \(0, 1\], got 0"),
    (dict(gradient_surgery="moco", gradient_surgery_options={"gamma": 0}), "options.gamma: expected a number > 0, got 0"),
    (dict(gradient_surgery="moco", gradient_surgery_options={"rho": -1}), "options.rho: expected a number >= 0"),
    (dict(gradient_surgery="moco", gradient_surgery_scope="shared"), "'moco' keeps a moving average per coordinate"),
])
def test_bad_gradient_surgery_options(options, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(build_model("mmoe", input_dim=8, tasks=TASKS), TrainerConfig(max_steps=1, progress=False, **options))
    assert list_gradient_surgeries() == ["aligned_mtl", "cagrad", "db_mtl", "fairgrad", "gradvac", "imtl", "metabalance", "mgda",
                                         "moco", "nash_mtl", "pcgrad", "upgrad"]


def _conflicting(num_tasks, seed, size=50):
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(1, size, generator=generator, dtype=torch.float64)
    return (torch.randn(num_tasks, size, generator=generator, dtype=torch.float64) + 0.3 * common) * torch.rand(
        num_tasks, 1, generator=generator, dtype=torch.float64).add(0.2)


def test_mgda_is_the_least_norm_point_of_the_gradients_hull():
    generator = torch.Generator()
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-0.5, 1.0], dtype=torch.float64)
    # Two tasks: the closed form, alpha g1 + (1 - alpha) g2 with alpha = (g2 - g1).g2 / |g1 - g2|^2 in [0, 1].
    alpha = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
    torch.testing.assert_close(mgda(torch.stack([g1, g2]), generator), 2 * (alpha * g1 + (1 - alpha) * g2))
    for num_tasks in (2, 3, 5, 8):
        for seed in range(4):
            grads = _conflicting(num_tasks, seed)
            d = mgda(grads, generator) / num_tasks
            # Optimality on the simplex: every task's gradient is at least |d|^2 along d (no loss rises),
            # with equality for some task; and no other convex combination is shorter.
            assert (grads @ d >= d @ d - 1e-7 * (d @ d)).all()
            assert (grads @ d).min() <= (d @ d) * (1 + 1e-6)
            mixes = torch.distributions.Dirichlet(torch.ones(num_tasks, dtype=torch.float64)).sample((2000,))
            assert (mixes @ grads).norm(dim=1).min() >= d.norm() * (1 - 1e-9)
    same = torch.tensor([[1.0, 2.0]] * 3)
    torch.testing.assert_close(mgda(same, generator), same.sum(0))  # agreeing tasks: the summed gradient
    opposed = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    torch.testing.assert_close(mgda(opposed, generator), torch.zeros(2))  # Pareto-stationary: no step


def test_cagrad_maximises_the_worst_improvement_within_its_ball():
    generator = torch.Generator()
    for num_tasks in (2, 3, 5):
        for seed in range(4):
            grads = _conflicting(num_tasks, seed)
            average = grads.mean(0)
            alpha = 0.5
            d = cagrad(grads, generator, alpha=alpha) * (1 + alpha**2) / num_tasks  # undo the rescaling
            radius = alpha * average.norm()
            assert (d - average).norm() <= radius * (1 + 1e-6)
            # No point of the ball around g0 does better for the task that gains least (sampled on its surface,
            # where the optimum of a linear minimum lies).
            directions = torch.randn(4000, grads.shape[1], dtype=torch.float64)
            candidates = average + radius * directions / directions.norm(dim=1, keepdim=True)
            assert (grads @ d).min() >= (candidates @ grads.T).min(dim=1).values.max() - 1e-9
            assert (grads @ d).min() >= (grads @ average).min() - 1e-9  # never worse than the average for the worst task
    grads = _conflicting(3, 0)
    torch.testing.assert_close(cagrad(grads, generator, alpha=0.0), grads.sum(0))
    same = torch.tensor([[1.0, 2.0]] * 2, dtype=torch.float64)
    torch.testing.assert_close(cagrad(same, generator, alpha=0.5), 2 * same[0] * 1.5 / 1.25)
    # Large alpha tends to MGDA's direction (the paper's limit).
    torch.testing.assert_close(cagrad(grads, generator, alpha=1e4) / cagrad(grads, generator, alpha=1e4).norm(),
                               mgda(grads, generator) / mgda(grads, generator).norm(), atol=1e-3, rtol=0)


def test_the_simplex_solver_beats_every_sampled_weighting():
    for num_tasks in (3, 6, 12):
        grads = _conflicting(num_tasks, num_tasks)
        gram = (grads @ grads.T).numpy()
        for linear, radius in ((np.zeros(num_tasks), 1.0), (gram.mean(1), 0.7 * np.sqrt(gram.mean()))):
            weights = _simplex_minimiser(gram, linear, radius)
            assert abs(weights.sum() - 1) < 1e-12 and (weights >= 0).all()

            def objective(w):
                return w @ linear + radius * np.sqrt(np.einsum("...i,ij,...j->...", w, gram, w))

            samples = np.random.default_rng(0).dirichlet(np.ones(num_tasks), 5000)
            assert objective(weights) <= objective(samples).min() + 1e-9


def test_aligned_mtl_sums_the_gradients_made_orthogonal_and_of_equal_norm():
    generator = torch.Generator()
    # Orthogonal gradients of norms 3 and 1: aligned to norm 1 each, the larger no longer dominates.
    torch.testing.assert_close(aligned_mtl(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), generator), torch.tensor([1.0, 1.0]))
    for num_tasks in (2, 3, 5):
        for seed in range(3):
            grads = _conflicting(num_tasks, seed)
            # With G = U S W' (thin SVD), the aligned gradients are s_min U W': orthogonal rows of norm s_min.
            u, singular, w = torch.linalg.svd(grads, full_matrices=False)
            torch.testing.assert_close(aligned_mtl(grads, generator), singular.min() * u.sum(0) @ w)
    same = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(aligned_mtl(same, generator), same.sum(0))  # rank one: the plain sum
    torch.testing.assert_close(aligned_mtl(torch.zeros(2, 3), generator), torch.zeros(3))


@pytest.mark.parametrize("surgery, scope", [("mgda", "all"), ("cagrad", "all"), ("aligned_mtl", "all"), ("imtl", "all"),
                                            ("nash_mtl", "all"), ("upgrad", "all"), ("gradvac", "all"), ("pcgrad", "shared"),
                                            ("mgda", "shared"), ("nash_mtl", "shared"), ("db_mtl", "all"), ("metabalance", "shared"),
                                            ("gradvac:per_layer", "shared"), ("fairgrad", "all"), ("moco", "all")])
def test_the_other_surgeries_train_both_conflicting_tasks(surgery, scope):
    """Labels of opposite sign on shared inputs: both tasks' losses still fall."""
    torch.manual_seed(0)
    data = _data(-1.0)
    model = build_model("shared_bottom", input_dim=8, tasks=TASKS)
    before = {name: v["loss"] for name, v in evaluate(model, data, TASKS).items()}
    options = {"main_task": "a"} if surgery == "metabalance" else {"alpha": 2.0} if surgery == "fairgrad" else {}
    if surgery.endswith(":per_layer"):
        surgery, options = surgery.split(":")[0], {"per_layer": True}
    Trainer(model, TrainerConfig(max_steps=150, batch_size=100, progress=False, gradient_surgery=surgery,
                                 gradient_surgery_options=options, gradient_surgery_scope=scope)).fit(data)
    after = {name: v["loss"] for name, v in evaluate(model, data, TASKS).items()}
    assert all(after[name] < 0.7 * before[name] for name in ("a", "b")), (before, after)


def test_imtl_projects_equally_on_every_tasks_unit_gradient():
    generator = torch.Generator()
    for num_tasks in (2, 3, 5, 8):
        for seed in range(3):
            grads = _conflicting(num_tasks, seed)
            d = imtl(grads, generator)
            projections = (grads / grads.norm(dim=1, keepdim=True)) @ d
            torch.testing.assert_close(projections, projections.mean().expand(num_tasks))
            # A mix of the gradients whose weights sum to 1, times K: least squares recovers them.
            weights = torch.linalg.lstsq(grads.T, d[:, None] / num_tasks).solution.flatten()
            torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
            # Scaling a task's loss changes neither its unit gradient nor, so, the direction.
            scaled = imtl(grads * torch.linspace(0.1, 10, num_tasks, dtype=torch.float64)[:, None], generator)
            torch.testing.assert_close((scaled @ d).abs() / (scaled.norm() * d.norm()), torch.tensor(1.0, dtype=torch.float64))
    # Orthogonal gradients of norms 3 and 1: weights 1/4 and 3/4 give both the projection 3/4; times 2.
    torch.testing.assert_close(imtl(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), generator), torch.tensor([1.5, 1.5]))
    same = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(imtl(same, generator), same.sum(0))  # dependent gradients: the pseudo-inverse
    torch.testing.assert_close(imtl(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), generator), torch.zeros(2))
    torch.testing.assert_close(imtl(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), generator), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(imtl(torch.zeros(2, 3), generator), torch.zeros(3))


def test_upgrad_sums_each_gradients_projection_onto_the_dual_cone():
    generator = torch.Generator()
    for num_tasks in (2, 3, 5, 8):
        for seed in range(3):
            grads = _conflicting(num_tasks, seed)
            gram = (grads @ grads.T).numpy()
            d = upgrad(grads, generator)
            assert (grads @ d >= -1e-9 * float(grads.norm()) ** 2).all()  # no task's loss rises
            weights = torch.from_numpy(_dual_cone_weights(gram))
            torch.testing.assert_close(weights.sum(0) @ grads, d)
            cone = torch.randn(20000, grads.shape[1], dtype=torch.float64) + d / d.norm()
            cone = cone[(cone @ grads.T >= 0).all(1)]  # sampled points v with G v >= 0
            for i in range(num_tasks):
                # Task i's projection G' w_i: the optimality conditions of min |v - g_i|^2 s.t. G v >= 0, with
                # multipliers w_i - e_i >= 0 that are 0 wherever the constraint is slack; and no sampled
                # point of the cone is closer.
                projection = weights[i] @ grads
                multipliers = weights[i] - torch.eye(num_tasks, dtype=torch.float64)[i]
                slack = grads @ projection
                scale = float(grads.norm()) ** 2
                assert (multipliers >= 0).all() and (slack >= -1e-9 * scale).all()
                assert (multipliers * slack).abs().max() <= 1e-7 * scale
                assert (cone - grads[i]).norm(dim=1).min() >= (projection - grads[i]).norm() - 1e-9
    # Two tasks: PCGrad's projections. No conflict: the plain sum.
    two = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(upgrad(two, generator), pcgrad(two, generator))
    agreeing = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(upgrad(agreeing, generator), agreeing.sum(0))
    torch.testing.assert_close(upgrad(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), generator), torch.zeros(2))
    torch.testing.assert_close(upgrad(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), generator), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(upgrad(torch.zeros(2, 3), generator), torch.zeros(3))


def test_nash_mtl_is_the_nash_bargaining_direction():
    generator = torch.Generator()
    for num_tasks in (2, 3, 5, 8):
        for seed in range(3):
            grads = _conflicting(num_tasks, seed)
            d = nash_mtl(grads, generator)
            gram = (grads @ grads.T).numpy()
            # Its weights solve (G G' / N) alpha = 1 / alpha, up to the 1e-12 ridge; so every task gains, and |d|^2 = K N.
            alpha = _fair_share_weights(gram)
            np.testing.assert_allclose((gram / np.linalg.norm(gram)) @ alpha, 1 / alpha, rtol=1e-6)
            assert (grads @ d > 0).all()
            torch.testing.assert_close(d @ d, torch.tensor(num_tasks * np.linalg.norm(gram), dtype=torch.float64))

            # The bargaining solution: no other direction of the same norm gives a larger sum of log gains
            # (sampled near d and over the gradients' span).
            def log_gains(u):
                gains = u @ grads.T
                return torch.where((gains > 0).all(-1), gains.clamp_min(1e-300).log().sum(-1), -torch.inf)

            mixes = torch.randn(3000, num_tasks, dtype=torch.float64) @ grads
            for spread in (0.01, 0.1, 1.0, 100.0):
                others = d + spread * d.norm() * mixes / mixes.norm(dim=1, keepdim=True)
                others = others / others.norm(dim=1, keepdim=True) * d.norm()
                assert log_gains(others).max() <= log_gains(d) + 1e-9
            # Scaling a task's loss leaves the direction as it was.
            scaled = nash_mtl(grads * torch.linspace(0.1, 10, num_tasks, dtype=torch.float64)[:, None], generator)
            torch.testing.assert_close(scaled / scaled.norm(), d / d.norm(), rtol=1e-6, atol=1e-9)
    same = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(nash_mtl(same, generator), same.sum(0))  # agreeing tasks: the summed gradient
    # Orthogonal gradients of norms 3 and 1 become the same length, sqrt(N) each, N = |diag(9, 1)| = sqrt(82).
    torch.testing.assert_close(nash_mtl(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), generator), torch.full((2,), 82**0.25))
    torch.testing.assert_close(nash_mtl(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), generator), torch.zeros(2))  # Pareto-stationary
    one = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(nash_mtl(one, generator), one[0])  # a task without gradient takes no part
    torch.testing.assert_close(nash_mtl(torch.zeros(2, 3), generator), torch.zeros(3))


def test_fairgrad_is_the_alpha_fair_direction():
    generator = torch.Generator()
    for num_tasks in (2, 3, 5):
        for seed in range(3):
            grads = _conflicting(num_tasks, seed)
            assert torch.equal(fairgrad(grads, generator), nash_mtl(grads, generator))  # alpha 1: proportional fairness
            gram = (grads @ grads.T).numpy()
            spreads = []
            for alpha in (0.5, 1.0, 2.0, 5.0):
                d = fairgrad(grads, generator, alpha=alpha)
                weights = _fair_share_weights(gram, alpha)
                np.testing.assert_allclose((gram / np.linalg.norm(gram)) @ weights, weights ** (-1 / alpha), rtol=1e-6)
                gains = grads @ d
                assert (gains > 0).all()
                spreads.append(float(gains.max() / gains.min()))

                # The alpha-fair allocation: no other direction of the same norm has a larger sum of utilities.
                def utility(u):
                    share = u @ grads.T
                    value = share.clamp_min(1e-300).log() if alpha == 1 else share.clamp_min(1e-300) ** (1 - alpha) / (1 - alpha)
                    return torch.where((share > 0).all(-1), value.sum(-1), -torch.inf)

                mixes = torch.randn(2000, num_tasks, dtype=torch.float64) @ grads
                for spread in (0.01, 0.1, 1.0):
                    others = d + spread * d.norm() * mixes / mixes.norm(dim=1, keepdim=True)
                    others = others / others.norm(dim=1, keepdim=True) * d.norm()
                    assert utility(others).max() <= utility(d) + 1e-9 * abs(float(utility(d)))
            # A larger alpha evens the tasks' gains out.
            assert spreads == sorted(spreads, reverse=True), spreads
    same = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    for alpha in (0.5, 2.0):
        torch.testing.assert_close(fairgrad(same, generator, alpha=alpha), same.sum(0))  # the same gradient: their sum
        one = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        torch.testing.assert_close(fairgrad(one, generator, alpha=alpha), one[0])  # a task without gradient takes no part


def test_gradvac_brings_conflicting_gradients_to_their_target_cosine():
    generator = torch.Generator().manual_seed(0)
    # With its targets at 0 (beta 0 keeps them there) GradVac is PCGrad, visiting the tasks in the same order.
    for num_tasks in (2, 3, 5):
        grads = _conflicting(num_tasks, num_tasks)
        vaccine = GradientVaccine(beta=0.0)
        torch.testing.assert_close(vaccine(grads, torch.Generator().manual_seed(3)), pcgrad(grads, torch.Generator().manual_seed(3)))
        assert torch.equal(vaccine.targets, torch.zeros(num_tasks, num_tasks, dtype=torch.float64))
    # Target 0.6, cosine below it: each gradient turns towards the other's until their cosine is 0.6,
    # keeping its component orthogonal to the other (only multiples of the other are added).
    g = torch.tensor([[2.0, 1.0, 0.0], [-1.0, 0.5, 1.0]], dtype=torch.float64)
    cosine = float(g[0] @ g[1] / (g[0].norm() * g[1].norm()))
    vaccine = GradientVaccine(beta=0.25)
    vaccine.load_state_dict({"targets": torch.tensor([[0.0, 0.6], [0.6, 0.0]], dtype=torch.float64)})

    def turned(own, other):
        along = other / other.norm()
        across = own - (own @ along) * along
        return (across.norm() / 0.8) * (0.6 * along + 0.8 * across / across.norm())

    torch.testing.assert_close(vaccine(g, generator), turned(g[0], g[1]) + turned(g[1], g[0]))
    # The targets move towards the cosine seen, at rate beta.
    expected = 0.75 * 0.6 + 0.25 * cosine
    torch.testing.assert_close(vaccine.state_dict()["targets"], torch.tensor([[0.0, expected], [expected, 0.0]], dtype=torch.float64))
    # Above its target a pair is left as it is (the plain sum); the targets still follow.
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    fresh = GradientVaccine(beta=0.5)
    torch.testing.assert_close(fresh(agreeing, generator), agreeing.sum(0))
    torch.testing.assert_close(fresh.targets, torch.tensor([[0.0, 0.5**1.5], [0.5**1.5, 0.0]], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="targets are for 2 tasks, but 3 gradients came"):
        fresh(torch.eye(3, dtype=torch.float64), generator)
    built = build_gradient_surgery("gradvac", {"beta": 0.1})
    assert isinstance(built, GradientVaccine) and built.beta == 0.1 and built.targets is None  # the trial call left no state


def test_gradvac_per_layer_adjusts_each_layer_on_its_own():
    generator = torch.Generator()
    # One layer spanning every coordinate: the whole-model GradVac, targets and all.
    whole, layered = GradientVaccine(beta=0.25), GradientVaccine(beta=0.25, per_layer=True)
    layout = GradientLayout(("a", "b", "c"), (40,))
    for step in range(5):
        g = _conflicting(3, step, size=40)
        torch.testing.assert_close(layered(g, torch.Generator().manual_seed(step), layout),
                                   whole(g, torch.Generator().manual_seed(step)))
    torch.testing.assert_close(layered.targets[..., 0], whole.targets)
    # Two layers, the first conflicting and the second not: with targets 0 (beta 0) that is PCGrad on the
    # first layer alone, and the second layer's plain sum; whole-model PCGrad would see no conflict.
    grads = torch.tensor([[1.0, 0.0, 5.0, 0.0], [-1.0, 1.0, 5.0, 1.0]], dtype=torch.float64)
    two = GradientLayout(("a", "b"), (2, 2))
    expected = torch.cat([pcgrad(grads[:, :2], generator), grads[:, 2:].sum(0)])
    torch.testing.assert_close(GradientVaccine(beta=0.0, per_layer=True)(grads, generator, two), expected)
    assert float(grads[0] @ grads[1]) > 0
    torch.testing.assert_close(GradientVaccine(beta=0.0)(grads, generator), grads.sum(0))
    # Positive targets: each layer's adjusted gradient reaches its own target cosine with the other's.
    vaccine = GradientVaccine(beta=0.0, per_layer=True)
    # a's targets towards b: 0.9 on the first layer, 0.95 on the second; b's towards a: -1, never adjusted.
    vaccine.load_state_dict({"targets": torch.tensor([[[0.0, 0.0], [0.9, 0.95]], [[-1.0, -1.0], [0.0, 0.0]]], dtype=torch.float64)})
    grads = _conflicting(2, 3, size=6)
    layers = GradientLayout(("a", "b"), (4, 2))
    combined = vaccine(grads, torch.Generator().manual_seed(0), layers)
    adjusted = combined - grads[1]

    def cosine(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    for columns, target in ((slice(0, 4), 0.9), (slice(4, 6), 0.95)):
        assert cosine(grads[0, columns], grads[1, columns]) < target
        assert cosine(adjusted[columns], grads[1, columns]) == pytest.approx(target, abs=1e-9)
    # The whole-model targets do not fit a layered run.
    with pytest.raises(RuntimeError, match=r"targets are for 2 tasks and layers \(2,\), but gradients of 2 tasks and 3 layers"):
        vaccine(torch.ones(2, 6, dtype=torch.float64), generator, GradientLayout(("a", "b"), (2, 2, 2)))
    with pytest.raises(ConfigError, match="per_layer: expected true or false, got 'yes'"):
        build_gradient_surgery("gradvac", {"per_layer": "yes"})
    assert build_gradient_surgery("gradvac", {"per_layer": True}).uses_layout


def test_db_mtl_rescales_each_tasks_moving_average_to_the_largest_norm():
    generator = torch.Generator()
    # Without averaging (beta 0): every gradient brought to the largest norm, then summed.
    grads = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    expected = grads[0] + 6 * grads[1] + (3 / 2**0.5) * grads[3]  # the zero gradient takes no part
    torch.testing.assert_close(DualBalancing(beta=0.0)(grads, generator), expected)
    same = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(DualBalancing(beta=0.0)(same, generator), same.sum(0))
    # With it: m <- g + r (m - g), r = beta / step**beta_sigma, from m = 0.
    for beta, sigma in ((0.9, 0.0), (0.5, 0.5)):
        balancing = DualBalancing(beta=beta, beta_sigma=sigma)
        averages = torch.zeros(3, 6, dtype=torch.float64)
        for step in range(1, 5):
            g = _conflicting(3, step, size=6)
            averages = g + beta / step**sigma * (averages - g)
            norms = averages.norm(dim=1)
            torch.testing.assert_close(balancing(g, generator), (norms.max() / norms) @ averages)
        torch.testing.assert_close(balancing.state_dict()["averages"], averages)
        resumed = DualBalancing(beta=beta, beta_sigma=sigma)
        resumed.load_state_dict(balancing.state_dict())
        g = _conflicting(3, 9, size=6)
        torch.testing.assert_close(resumed(g, generator), balancing(g, generator))
    with pytest.raises(RuntimeError, match=r"moving averages are \(3, 6\).*gradients of \(3, 5\)"):
        balancing(torch.ones(3, 5, dtype=torch.float64), generator)
    assert build_gradient_surgery("db_mtl", {"beta": 0.8}).averages is None  # the trial call left no state


def test_moco_tracks_the_gradients_rescaled_to_the_losses_and_moves_its_weights_a_softmax_step():
    generator = torch.Generator()
    for beta, beta_sigma, gamma, gamma_sigma, rho in ((0.5, 0.5, 0.1, 0.5, 0.0), (0.9, 0.0, 1.0, 0.0, 0.5)):
        moco = MoCo(beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho)
        tracked, weights = torch.zeros(3, 6, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
        for step in range(1, 5):
            g = _conflicting(3, step, size=6)
            losses = torch.tensor([0.5, 2.0, 1.0 + step], dtype=torch.float64)
            rescaled = torch.stack([g[k] / (g[k].norm() + 1e-8) * losses[k] for k in range(3)])
            tracked = tracked - beta / step**beta_sigma * (tracked - rescaled)
            pull = (tracked @ tracked.T + rho * torch.eye(3, dtype=torch.float64)) @ weights
            weights = torch.softmax(weights - gamma / step**gamma_sigma * pull, dim=0)
            torch.testing.assert_close(moco(g, generator, losses=losses), weights @ tracked)
        torch.testing.assert_close(moco.state_dict()["weights"], weights)
        assert abs(float(weights.sum()) - 1) < 1e-12 and moco.state_dict()["steps"] == 4
        resumed = MoCo(beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho)
        resumed.load_state_dict(moco.state_dict())
        g, losses = _conflicting(3, 9, size=6), torch.ones(3, dtype=torch.float64)
        torch.testing.assert_close(resumed(g, generator, losses=losses), moco(g, generator, losses=losses))
    # The same gradient and loss for every task: the direction is that gradient, at the loss's size.
    same = torch.tensor([[3.0, 4.0]] * 2, dtype=torch.float64)
    direction = MoCo(beta=1.0)(same, generator, losses=torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(direction, torch.tensor([1.2, 1.6], dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"tracked gradients are \(3, 6\).*gradients of \(3, 5\)"):
        moco(torch.ones(3, 5, dtype=torch.float64), generator, losses=torch.ones(3))
    assert build_gradient_surgery("moco", {"gamma": 0.3}).tracked is None  # the trial call left no state


def _one_recorded_step(surgery, record):
    """One step of MMoE on two tasks weighted 2 and 0.5 with ``surgery``, ``record(*arguments, **keywords)``
    seeing what the trainer hands it. Returns the tasks, the data and the model back at its initial weights."""
    tasks = [TaskSpec("a", "regression", weight=2.0), TaskSpec("b", "regression", weight=0.5)]
    data = _data(1.0)
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=tasks)
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=1000, progress=False, gradient_surgery=surgery))
    original = trainer._surgery
    trainer._surgery = lambda *arguments, **keywords: record(*arguments, **keywords) or original(*arguments, **keywords)
    trainer.fit(data)
    with torch.no_grad():
        for p, value in zip(model.parameters(), initial):
            p.copy_(value)
    return tasks, data, model


def test_moco_is_handed_the_weighted_losses():
    seen = []
    tasks, data, model = _one_recorded_step("moco", lambda grads, generator, losses: seen.append(losses.clone()))
    with torch.no_grad():
        outputs = model(data.inputs)
        expected = [task.weight * torch.nn.functional.mse_loss(outputs[task.name][:, 0], data.labels[:, k])
                    for k, task in enumerate(tasks)]
    assert len(seen) == 1 and not seen[0].requires_grad
    torch.testing.assert_close(seen[0], torch.stack(expected), rtol=1e-5, atol=1e-7)


def test_metabalance_brings_each_auxiliary_gradient_towards_the_main_ones_norm_layer_by_layer():
    generator = torch.Generator()
    # Rows: tasks "click", "buy" (main), "cart"; columns: a layer of 2 coordinates, then one of 3.
    layout = GradientLayout(("click", "buy", "cart"), (2, 3))
    grads = torch.tensor([[3.0, 4.0, 0.0, 0.0, 1.0],
                          [0.0, 1.0, 2.0, 0.0, 0.0],
                          [0.0, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # Without averaging (beta 0) and relax_factor 1, every auxiliary gradient takes the main one's norm on
    # each layer: click's 5 -> 1 on the first; on the second, which the main task reaches and cart does not,
    # click's 1 -> 2. The main gradient is kept.
    full = MetaBalance(main_task="buy", relax_factor=1.0, beta=0.0)
    expected = grads[1] + torch.tensor([0.6, 0.8, 0.0, 0.0, 2.0], dtype=torch.float64) + torch.tensor([0.0, 1.0, 0, 0, 0])
    torch.testing.assert_close(full(grads, generator, layout), expected)
    # relax_factor r mixes the rescaled gradient and the original: r * scaled + (1 - r) * original.
    half = MetaBalance(main_task="buy", relax_factor=0.25, beta=0.0)(grads, generator, layout)
    torch.testing.assert_close(half, 0.25 * expected + 0.75 * grads.sum(0))
    none = MetaBalance(main_task="buy", relax_factor=0.0, beta=0.0)(grads, generator, layout)
    torch.testing.assert_close(none, grads.sum(0))
    same = torch.tensor([[1.0, 2.0, 3.0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(MetaBalance(main_task="a")(same, generator, GradientLayout(("a", "b", "c"), (1, 2))), same.sum(0))
    # A layer the main task does not reach keeps the auxiliary gradients as they are.
    unreached = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    fresh = MetaBalance(main_task="buy", relax_factor=1.0, beta=0.0)
    torch.testing.assert_close(fresh(unreached, generator, GradientLayout(("click", "buy", "cart"), (2,))), unreached.sum(0))
    # With averaging: m_k <- beta m_k + (1 - beta) |g_k| per layer, from 0, and the ratios of the averages.
    balance = MetaBalance(main_task="b", relax_factor=0.7, beta=0.9)
    layout = GradientLayout(("a", "b", "c"), (4, 0, 2))
    averages = torch.zeros(3, 3, dtype=torch.float64)
    for step in range(1, 5):
        g = _conflicting(3, step, size=6)
        norms = torch.stack([g[:, :4].norm(dim=1), torch.zeros(3, dtype=torch.float64), g[:, 4:].norm(dim=1)], 1)
        averages = 0.9 * averages + 0.1 * norms
        scales = 0.7 * averages[1] / averages.clamp_min(1e-300) + 0.3
        scales[:, 1] = 1.0  # an empty layer
        scales[1] = 1.0
        expected = (scales[:, [0, 0, 0, 0, 2, 2]] * g).sum(0)
        torch.testing.assert_close(balance(g, generator, layout), expected)
    torch.testing.assert_close(balance.state_dict()["averages"], averages)
    resumed = MetaBalance(main_task="b", relax_factor=0.7, beta=0.9)
    resumed.load_state_dict(balance.state_dict())
    g = _conflicting(3, 9, size=6)
    torch.testing.assert_close(resumed(g, generator, layout), balance(g, generator, layout))
    with pytest.raises(RuntimeError, match=r"averages are \(3, 3\) \(tasks, layers\), but gradients for \(3, 2\)"):
        balance(g, generator, GradientLayout(("a", "b", "c"), (4, 2)))


def test_metabalance_in_the_trainer_sees_the_shared_layers_and_the_weighted_tasks(monkeypatch):
    """Under scope shared the trainer hands MetaBalance the weighted tasks' names in row order and, per
    parameter tensor, how many of its coordinates at least two tasks reach; the towers and gates keep
    their own task's gradient, and on the experts an auxiliary task ten times the main one's scale
    contributes a gradient of the main one's norm (relax_factor 1, beta 0)."""
    tasks = [TaskSpec("aux", "regression"), TaskSpec("off", "regression", weight=0.0), TaskSpec("main", "regression")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    data = MultiTaskTensors(x, torch.cat([10 * y, y, y], 1), ["aux", "off", "main"])
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=tasks, num_experts=3, expert_hidden=[6])
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=500, progress=False, gradient_surgery="metabalance",
                                           gradient_surgery_scope="shared",
                                           gradient_surgery_options={"main_task": "main", "relax_factor": 1.0, "beta": 0.0}))
    seen = []
    original = trainer._surgery
    monkeypatch.setattr(trainer, "_surgery", lambda grads, generator, layout: seen.append((grads.clone(), layout))
                        or original(grads, generator, layout))
    initial = [p.detach().clone() for p in model.parameters()]
    trainer.fit(data)
    (grads, layout), = seen
    assert layout.task_names == ("aux", "main")
    names = [name for name, _ in model.named_parameters()]
    sizes = dict(zip(names, layout.segment_sizes))
    assert sum(layout.segment_sizes) == grads.shape[1] and len(layout.segment_sizes) == len(names)
    assert all(n > 0 for name, n in sizes.items() if "expert" in name), sizes
    assert all(n == 0 for name, n in sizes.items() if "expert" not in name), sizes
    # The combined gradient, recomputed from the initial weights: on each expert tensor the auxiliary
    # gradient scaled to the main one's norm; elsewhere each task's own.
    with torch.no_grad():
        for p, value in zip(model.parameters(), initial):
            p.copy_(value)
    outputs = model(data.inputs)
    per_task = {}
    for k, task in enumerate(tasks):
        if task.weight:
            loss = torch.nn.functional.mse_loss(outputs[task.name][:, 0], data.labels[:, k])
            per_task[task.name] = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
    for name, p, aux, main in zip(names, model.parameters(), per_task["aux"], per_task["main"]):
        aux = torch.zeros_like(p) if aux is None else aux
        main = torch.zeros_like(p) if main is None else main
        expected = main + (aux * main.norm() / aux.norm() if "expert" in name else aux)
        if "expert" in name:
            assert aux.norm() > 3 * main.norm()  # the auxiliary task's scale dominated the plain sum
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match=r"main_task: 'off' is not a task with a non-zero weight; expected one of \['aux', 'main'\]"):
        Trainer(model, TrainerConfig(max_steps=1, progress=False, gradient_surgery="metabalance", gradient_surgery_scope="shared",
                                     gradient_surgery_options={"main_task": "off"}))


def test_db_mtl_gets_the_gradients_of_the_weighted_log_losses():
    """The trainer hands DB-MTL each task's gradient of ``w_k log L_k``: a task's loss scale no longer sets its gradient's."""
    seen = []
    tasks, data, model = _one_recorded_step("db_mtl", lambda grads, generator: seen.append(grads.clone()))
    outputs = model(data.inputs)
    expected = []
    for k, task in enumerate(tasks):
        loss = torch.nn.functional.mse_loss(outputs[task.name][:, 0], data.labels[:, k])
        grads = torch.autograd.grad(task.weight * torch.log(loss + 1e-8), list(model.parameters()), retain_graph=True,
                                    allow_unused=True)
        expected.append(torch.cat([torch.zeros(p.numel()) if g is None else g.reshape(-1) for p, g in zip(model.parameters(), grads)]))
    torch.testing.assert_close(seen[0], torch.stack(expected), rtol=1e-4, atol=1e-6)
    # A loss that may be negative has no logarithm.
    with pytest.raises(ConfigError, match=r"'db_mtl' takes the log of every task's loss.*'visits' \(poisson\)"):
        Trainer(build_model("mmoe", input_dim=8, tasks=[TaskSpec("a", "regression"), TaskSpec("visits", "poisson")]),
                TrainerConfig(max_steps=1, progress=False, gradient_surgery="db_mtl"))


def test_imtl_with_learned_loss_scales_is_the_papers_hybrid():
    """``uncertainty`` with ``imtl``: the scales ``s_k`` step on the weighting's own objective
    ``sum_k exp(-s_k) L_k + s_k`` (IMTL-L's ``exp(s) L - s`` with ``s`` of the other sign), the model on
    IMTL-G's combination of the gradients of the scaled losses ``exp(-s_k) L_k``; over training each
    scaled loss goes to 1, whatever the losses' scales."""
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=TASKS)
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=100, progress=False, gradient_surgery="imtl",
                                           weighting="uncertainty"))
    with torch.no_grad():
        trainer.weighting.log_variance.copy_(torch.tensor([0.3, -0.5]))
    batch = next(iter(_data(-1.0).batches(100)))
    _, losses = trainer.batch_objective(batch)
    scales = torch.exp(-trainer.weighting.log_variance.detach())
    parameters = list(model.parameters())
    scaled = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(scale * losses[t.name], parameters, retain_graph=True)])
                          for scale, t in zip(scales, TASKS)])
    trainer._surgery_backward(losses)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in parameters]), imtl(scaled, torch.Generator()), rtol=1e-5, atol=1e-7)
    expected = 1 - scales * torch.stack([losses[t.name].detach() for t in TASKS])
    torch.testing.assert_close(trainer.weighting.log_variance.grad, expected)
    # Adam steps them, also where a small model's gradients live in one flat buffer (no learning rate of their own).
    trainer.fit(_data(-1.0))
    assert (trainer.weighting.log_variance.detach() - torch.tensor([0.3, -0.5])).abs().min() > 1e-4

    # Task b's labels 5 times a's: after 200 steps its loss is 79-429 times a's (seeds 0-4), and the
    # learned scales bring both to 0.91-1.34.
    data = _data(1.0)
    data = MultiTaskTensors(data.inputs, data.labels * torch.tensor([1.0, 5.0]), ["a", "b"])
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=TASKS)
    trainer = Trainer(model, TrainerConfig(max_steps=200, max_epochs=None, batch_size=100, progress=False, gradient_surgery="imtl",
                                           weighting="uncertainty", weighting_learning_rate=0.05))
    trainer.fit(data)
    losses = evaluate(model, data, TASKS)
    scaled = [math.exp(-trainer.weighting.log_variance[k].item()) * losses[t.name]["loss"] for k, t in enumerate(TASKS)]
    assert losses["b"]["loss"] > 50 * losses["a"]["loss"]
    assert all(0.5 < value < 2.0 for value in scaled), scaled


def test_cagrad_at_alpha_zero_trains_as_the_weighted_sum():
    trained = []
    for options in (None, {"gradient_surgery": "cagrad", "gradient_surgery_options": {"alpha": 0.0}}):
        torch.manual_seed(0)
        model = build_model("mmoe", input_dim=8, tasks=TASKS)
        Trainer(model, TrainerConfig(max_steps=15, batch_size=100, progress=False, **(options or {}))).fit(_data(-1.0))
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(trained[1], trained[0], atol=1e-5, rtol=1e-4)
    assert build_gradient_surgery("cagrad", {"alpha": 0.2}).keywords == {"alpha": 0.2}


def test_the_pcgrad_example_runs():

    done = run_example("pcgrad_synthetic.py", "--seeds", "1", "--correlations", "0", "--steps", "20",
                       "--surgeries", "gradvac", "--options", '{"per_layer": true}')
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ratio_mean" in done.stdout and "shared_bottom" in done.stdout and "gradvac" in done.stdout


def test_the_metabalance_example_runs():
    done = run_example("metabalance_funnel.py", "--seeds", "2", "--rows", "3000", "--epochs", "1", "--models", "mmoe",
                       "--relax-factors", "0.5,1")
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("purchase test AUC, 2 seeds")[1]
    for variant in ("purchase only", "none", "aux x 0.1", "metabalance r=0.5", "metabalance r=1"):
        assert variant in table
    none_row = next(line for line in table.splitlines() if " none " in line)
    assert "+0.0000" in none_row  # the plain run's paired difference to itself


def test_the_objectives_command_lists_every_method_with_its_options():
    from in_process import run_cli

    done = run_cli("objectives", columns=250)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") >= 4}
    for name in list_gradient_surgeries():
        assert name in rows, name
    assert "main_task (needed), relax_factor=0.7, beta=0.9" in rows["metabalance"]
    assert rows["metabalance"].rstrip("│ ").endswith("│ shared, shared_fixed")
    assert "PCGrad (\"projecting conflicting gradients\", Yu et al., NeurIPS 2020)" in rows["pcgrad"]
    assert "alpha=1.0" in rows["fairgrad"] and "beta=0.01, per_layer=False" in rows["gradvac"]
    assert rows["db_mtl"].rstrip("│ ").endswith("│ all, shared_fixed") and rows["pcgrad"].rstrip("│ ").endswith("all, shared, shared_fixed")
    for name, options in (("dwa", "temperature=2.0"), ("famo", "learning_rate=0.025"), ("uncertainty", "│ -")):
        assert name in rows and options in rows[name], name
