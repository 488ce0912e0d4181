"""The batch-last one-node mixture (``models/small_mixture.py``) against the module path it replaces."""

import pytest
import torch

from mtlkit import TaskSpec
from mtlkit.models import build_model
from mtlkit.models.small_mixture import MixtureLevel, _node_arguments, _small_mixture_ops, _SmallMixture, small_mixture

TASKS = [TaskSpec("a", "regression"), TaskSpec("b", "binary"), TaskSpec("c", "regression")]


def _module_path(model, x):
    """The forward the small mixture replaces, module by module."""
    model.small_mixture = False
    try:
        return model(x)
    finally:
        model.small_mixture = True


def _outputs_and_grads(outputs, x, params, tasks=TASKS):
    stacked = torch.cat([outputs[t.name] for t in tasks], dim=1)
    upstream = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(7), dtype=stacked.dtype)
    return stacked.detach(), torch.autograd.grad(stacked, [x, *params], upstream)


CONFIGS = [
    ("mmoe", dict(num_experts=5, expert_hidden=(6,), tower_hidden=(4,))),
    ("mmoe", dict(num_experts=3, expert_hidden=(6, 5), tower_hidden=(4, 3), gate_temperature=0.7)),
    ("mmoe", dict(num_experts=4, expert_hidden=(6,), tower_hidden=())),
    ("omoe", dict(num_experts=5, expert_hidden=(6,), tower_hidden=(4,))),
    ("omoe", dict(num_experts=4, expert_hidden=(6, 2), tower_hidden=())),
    ("cgc", dict(num_shared_experts=3, num_task_experts=2, expert_hidden=(6,), tower_hidden=(4,))),
    ("cgc", dict(num_shared_experts=0, num_task_experts=1, expert_hidden=(5, 4), tower_hidden=(3,), gate_temperature=2.0)),
    ("ple", dict(num_shared_experts=3, num_task_experts=2, num_levels=2, expert_hidden=(6,), tower_hidden=(4,))),
    ("ple", dict(num_shared_experts=2, num_task_experts=1, num_levels=3, expert_hidden=(6, 5), tower_hidden=(),
                 gate_temperature=0.5)),
    ("ple", dict(num_shared_experts=0, num_task_experts=2, num_levels=2, expert_hidden=(4,), tower_hidden=(3, 2))),
    # AdaTT: learned residuals (with and without a shared gate), the unit one, and none.
    ("adatt", dict(num_shared_experts=2, num_task_experts=2, num_levels=2, expert_hidden=(6,), tower_hidden=(4,))),
    ("adatt", dict(num_shared_experts=0, num_task_experts=3, num_levels=3, expert_hidden=(5, 4), tower_hidden=(3,),
                   gate_temperature=0.5)),
    ("adatt", dict(num_shared_experts=1, num_task_experts=1, num_levels=2, expert_hidden=(6,), tower_hidden=(4,))),
    ("adatt", dict(num_shared_experts=1, num_task_experts=2, num_levels=1, expert_hidden=(6,), tower_hidden=(),
                   native_residual=False)),
    # Top-k softmax gates: each row's other experts get weight 0 and no gradient.
    ("mmoe", dict(num_experts=5, expert_hidden=(6,), tower_hidden=(4,), gate_top_k=2, gate_temperature=0.7)),
    ("omoe", dict(num_experts=4, expert_hidden=(6,), tower_hidden=(4,), gate_top_k=1)),
    ("ple", dict(num_shared_experts=3, num_task_experts=2, num_levels=2, expert_hidden=(6,), tower_hidden=(4,), gate_top_k=3)),
    # DSelect-k gates without a penalty (every gate over a power of two of experts, no entropy term).
    ("mmoe", dict(num_experts=4, expert_hidden=(6,), tower_hidden=(4,), gate_type="dselect_k", gate_top_k=2)),
    ("omoe", dict(num_experts=8, expert_hidden=(6,), tower_hidden=(4,), gate_type="dselect_k", gate_top_k=1)),
    ("cgc", dict(num_shared_experts=2, num_task_experts=2, expert_hidden=(6,), tower_hidden=(4,), gate_type="dselect_k",
                 gate_top_k=2, gate_smooth_step_width=0.5)),
    ("ple", dict(num_shared_experts=2, num_task_experts=2, num_levels=2, expert_hidden=(6,), tower_hidden=(4,),
                 gate_type="dselect_k", gate_top_k=3)),
    # Gates conditioned on the task alone: the logits are the bias.
    ("mmoe", dict(num_experts=5, expert_hidden=(6,), tower_hidden=(4,), gate_conditioning="task")),
    ("ple", dict(num_shared_experts=3, num_task_experts=2, num_levels=2, expert_hidden=(6,), tower_hidden=(4,),
                 gate_conditioning="task", gate_top_k=2)),
    ("cgc", dict(num_shared_experts=2, num_task_experts=2, expert_hidden=(6,), tower_hidden=(4,), gate_type="dselect_k",
                 gate_top_k=2, gate_conditioning="task")),
]


@pytest.mark.parametrize("name,config", CONFIGS)
def test_small_mixture_equals_the_module_path(name, config):
    """Forward and every gradient (input and parameters), float64, to 1e-12."""
    torch.manual_seed(0)
    model = build_model(name, input_dim=9, tasks=TASKS, **config).double()
    x = torch.randn(13, 9, dtype=torch.double, requires_grad=True)
    assert model.takes_small_mixture_path(x)
    params = list(model.parameters())
    fast, fast_grads = _outputs_and_grads(model(x), x, params)
    plain, plain_grads = _outputs_and_grads(_module_path(model, x), x, params)
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=0)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,config", [CONFIGS[0], CONFIGS[3], CONFIGS[5], CONFIGS[7]])
def test_heads_of_different_widths(name, config):
    """A multiclass head (4 logits) beside one-wide heads: the stacked heads are padded to 4 and each
    task reads its own width, on both paths."""
    tasks = [TaskSpec("genre", "multiclass", num_classes=4), TaskSpec("b", "binary"), TaskSpec("c", "regression")]
    torch.manual_seed(0)
    model = build_model(name, input_dim=9, tasks=tasks, **config).double()
    x = torch.randn(13, 9, dtype=torch.double, requires_grad=True)
    assert model.takes_small_mixture_path(x)
    params = list(model.parameters())
    outputs = model(x)
    assert [tuple(outputs[t.name].shape) for t in tasks] == [(13, 4), (13, 1), (13, 1)]
    fast, fast_grads = _outputs_and_grads(outputs, x, params, tasks)
    plain, plain_grads = _outputs_and_grads(_module_path(model, x), x, params, tasks)
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=0)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,config", CONFIGS)
def test_operator_form_for_torch_compile_equals_the_node(name, config):
    """The form torch.compile traces (plain operators; experts reading their level's input through
    expand and cat) against the node: forward and every gradient, float64, to 1e-12."""
    torch.manual_seed(0)
    model = build_model(name, input_dim=9, tasks=TASKS, **config).double()
    x = torch.randn(13, 9, dtype=torch.double, requires_grad=True)
    levels = model._mixture_levels() if name in ("cgc", "ple", "adatt") else [(model.experts, model.gates)]
    structure, params = _node_arguments(levels, model.towers)
    if name in ("ple", "adatt"):
        assert all(sizes is not None for _, _, _, _, sizes, *_ in structure[0][1:])  # the expand-and-cat form is tested
    upstream = torch.randn(3, 1, 13, generator=torch.Generator().manual_seed(7), dtype=torch.double)
    results = []
    for form in (lambda: _small_mixture_ops(x, structure, params), lambda: _SmallMixture.apply(x, structure, *params)):
        out = form()
        # AdaTT's unit residual is a constant buffer among the node's tensors.
        results.append((out.detach(), torch.autograd.grad(out, [x, *(p for p in params if p.requires_grad)], upstream)))
    (ops, ops_grads), (node, node_grads) = results
    torch.testing.assert_close(ops, node, atol=1e-12, rtol=0)
    for a, b in zip(ops_grads, node_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["ple", "adatt"])
def test_compiled_mixture_trains_like_the_eager_one(name):
    """Under torch.compile (inductor) the model traces in one graph and its outputs and gradients
    agree with the eager node's, in float32 (AdaTT: its residual traced with the levels)."""
    torch.manual_seed(8)
    model = build_model(name, input_dim=9, tasks=TASKS, num_shared_experts=3, num_task_experts=2, num_levels=2,
                        expert_hidden=(6,), tower_hidden=(4,))
    x = torch.randn(32, 9, requires_grad=True)
    params = list(model.parameters())
    eager = _outputs_and_grads(model(x), x, params)
    compiled = _outputs_and_grads(torch.compile(model, fullgraph=True, dynamic=False)(x), x, params)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_small_mixture_float32_training_step_matches():
    """W1's shapes in float32: the losses agree to rounding and each gradient to 1e-5 of its size."""
    torch.manual_seed(1)
    model = build_model("mmoe", input_dim=100, tasks=TASKS[:2], num_experts=8, expert_hidden=(16,), tower_hidden=(8,))
    x = torch.randn(1024, 100)
    params = list(model.parameters())
    fast = model(x)
    plain = _module_path(model, x)
    for t in TASKS[:2]:
        torch.testing.assert_close(fast[t.name], plain[t.name], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(sum(o.square().mean() for o in out.values()), params) for out in (fast, plain)]
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_gradients_nobody_needs_are_skipped():
    torch.manual_seed(2)
    model = build_model("mmoe", input_dim=5, tasks=TASKS[:2], num_experts=3, expert_hidden=(4,), tower_hidden=(2,))
    model.gates.linear.weight.requires_grad_(False)
    x = torch.randn(6, 5)  # no gradient wanted for the input
    sum(o.sum() for o in model(x).values()).backward()
    assert model.gates.linear.weight.grad is None
    assert model.gates.linear.bias.grad is not None and model.experts.linears[0].weight.grad is not None


def test_excluded_gate_entries_get_no_gradient():
    torch.manual_seed(3)
    model = build_model("cgc", input_dim=5, tasks=TASKS[:2], num_shared_experts=1, num_task_experts=2,
                        expert_hidden=(4,), tower_hidden=(2,))
    sum(o.sum() for o in model(torch.randn(6, 5)).values()).backward()
    excluded = torch.isinf(model.levels[0].gates.choice_mask)
    assert excluded.any()
    grad = model.levels[0].gates.linear.weight.grad.view(5, *excluded.shape)
    assert (grad[:, excluded] == 0).all() and (grad[:, ~excluded] != 0).any()


@pytest.mark.parametrize("levels, residual", [(1, False), (2, False), (2, True)])
def test_small_mixture_gradcheck(levels, residual):
    torch.manual_seed(4)
    double = dict(dtype=torch.double, requires_grad=True)
    x = torch.randn(5, 4, **double)
    # 3 experts of width 2 and 2 gates over them on x; then 3 experts reading the 2 mixtures
    # (groups 0, 1, 1) and 2 gates; then towers.
    params = [torch.randn(4, 3 * 2, **double), torch.randn(3, 2, **double), torch.randn(4, 2 * 3, **double), torch.randn(2, 3, **double)]
    if levels == 2:
        params += [torch.randn(3, 2, 2, **double), torch.randn(3, 2, **double), torch.randn(2, 2, 3, **double), torch.randn(2, 3, **double)]
    params += [torch.randn(2, 2, 3, **double), torch.randn(2, 3, **double), torch.randn(2, 3, 1, **double), torch.randn(2, 1, **double)]
    mask = torch.tensor([[0.0, float("-inf"), 0.0], [0.0, 0.0, 0.0]], dtype=torch.double)
    if residual:  # offsets added to the second level's gate weights (AdaTT's native experts)
        params.append(torch.randn(2, 3, **double))

    def fn(x, *p):
        stack = [MixtureLevel([p[0]], [p[1]], p[2], p[3], temperature=1.5)]
        if levels == 2:
            stack.append(MixtureLevel([p[4]], [p[5]], p[6], p[7], gate_mask=mask, expert_groups=torch.tensor([0, 1, 1]),
                                      gate_residual=p[-1] if residual else None))
        t = p[4 * levels :]
        return small_mixture(x, stack, [t[0], t[2]], [t[1], t[3]], towers_shared=False)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("name,config", [
    ("mmoe", dict(num_experts=5, expert_hidden=(6,), tower_hidden=(4,), gate_dropout=0.3)),
    ("ple", dict(num_shared_experts=3, num_task_experts=2, num_levels=2, expert_hidden=(6,), tower_hidden=(4,),
                 gate_dropout=0.4, gate_top_k=2)),
])
def test_gate_dropout_on_the_node_draws_the_module_paths_masks(name, config):
    """In training the node drops the same experts for the same rows as the module path from the same
    random state (forward and every gradient); in evaluation it drops none."""
    torch.manual_seed(0)
    model = build_model(name, input_dim=9, tasks=TASKS, **config).double()
    x = torch.randn(13, 9, dtype=torch.double, requires_grad=True)
    params = list(model.parameters())
    model.train()
    assert model.takes_small_mixture_path(x)
    results = []
    for path in (model, lambda inputs: _module_path(model, inputs)):
        torch.manual_seed(1)
        results.append(_outputs_and_grads(path(x), x, params))
    (fast, fast_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=0)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-12, rtol=0)
    model.eval()
    evaluated = _outputs_and_grads(model(x), x, params)[0]
    assert not torch.allclose(evaluated, fast)  # training dropped some experts somewhere
    torch.manual_seed(2)
    torch.testing.assert_close(_outputs_and_grads(model(x), x, params)[0], evaluated, atol=0, rtol=0)


@pytest.mark.parametrize("name,config", [
    ("mmoe", dict(num_experts=4, expert_hidden=(6,), tower_hidden=(4,), gate_entropy_weight=0.1)),
    ("mmoe", dict(num_experts=6, expert_hidden=(6,), tower_hidden=(4,))),  # codes of no expert
    ("ple", dict(num_shared_experts=2, num_task_experts=1, num_levels=2, expert_hidden=(6,), tower_hidden=(4,),
                 gate_entropy_weight=0.05)),
])
def test_dselect_penalty_from_the_node_equals_the_module_paths(name, config):
    """The gates' penalty (entropy, weight on codes of no expert) from the node's codes output: its
    value and the gradients of outputs plus penalty, float64, to 1e-12."""
    torch.manual_seed(0)
    model = build_model(name, input_dim=9, tasks=TASKS, gate_type="dselect_k", gate_top_k=2, **config).double()
    x = torch.randn(13, 9, dtype=torch.double, requires_grad=True)
    params = list(model.parameters())
    assert model.takes_small_mixture_path(x)
    results = []
    for path in (model, lambda inputs: _module_path(model, inputs)):
        outputs = path(x)
        penalty = model.auxiliary_loss(outputs)
        stacked = torch.cat([outputs[t.name] for t in TASKS], dim=1)
        upstream = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(7), dtype=stacked.dtype)
        results.append((penalty.detach(), torch.autograd.grad((stacked * upstream).sum() + penalty, [x, *params])))
    (fast_penalty, fast_grads), (plain_penalty, plain_grads) = results
    assert fast_penalty > 0
    torch.testing.assert_close(fast_penalty, plain_penalty, atol=1e-12, rtol=0)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-12, rtol=0)


def test_module_path_where_the_small_mixture_does_not_apply():
    torch.manual_seed(5)
    x = torch.randn(4, 6)
    assert not build_model("mmoe", input_dim=6, tasks=TASKS, activation="gelu").takes_small_mixture_path(x)
    assert not build_model("mmoe", input_dim=6, tasks=TASKS, dropout=0.1).takes_small_mixture_path(x)
    assert not build_model("mmoe", input_dim=6, tasks=TASKS, norm="layer").takes_small_mixture_path(x)
    for options in ({"gate_entropy_weight": 0.1}, {"num_experts": 6}):  # DSelect-k gates with a penalty too
        assert build_model("mmoe", input_dim=6, tasks=TASKS, gate_type="dselect_k", gate_top_k=2, **options).takes_small_mixture_path(x)
    assert build_model("mmoe", input_dim=6, tasks=TASKS, gate_top_k=2).takes_small_mixture_path(x)
    assert build_model("ple", input_dim=6, tasks=TASKS, num_levels=2).takes_small_mixture_path(x)
    large = build_model("mmoe", input_dim=6, tasks=TASKS, num_experts=8, expert_hidden=(256,))
    assert not large.takes_small_mixture_path(torch.randn(512, 6))  # 1 M activations: the GEMMs dominate
    assert large.takes_small_mixture_path(torch.randn(8, 6))
    model = build_model("mmoe", input_dim=6, tasks=TASKS)
    assert model.takes_small_mixture_path(x)
    model.small_mixture = False
    assert not model.takes_small_mixture_path(x)


def test_gate_recording_and_hooks_take_the_module_path():
    torch.manual_seed(6)
    model = build_model("mmoe", input_dim=6, tasks=TASKS)
    x = torch.randn(4, 6)
    with model.recording_gates() as gate_weights:
        assert not model.takes_small_mixture_path(x)
        model(x)
    assert gate_weights["gates"].shape == (4, 3, 8)
    seen = []
    handle = model.experts.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(x)
    handle.remove()
    assert seen == [(4, 8, 16)]
