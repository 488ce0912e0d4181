"""AdaTT: every gate fuses all of a level's experts, plus the native-expert residual."""

import pytest
import torch

from mtlkit import ConfigError
from mtlkit.models import build_model

from forward_hooks import inputs_and_outputs


def _uniform_gates(model):
    """Zero every gate's weights and biases: each gate then gives every expert 1/E."""
    with torch.no_grad():
        for bank in model.gate_banks().values():
            bank.linear.weight.zero_()
            bank.linear.bias.zero_()


def _level_outputs(model, x):
    """Each level's input and output in one forward (module by module: the CPU's one-node path has no levels to hook)."""
    model.small_mixture = False
    return inputs_and_outputs(model, x, list(model.levels))


def test_sp_variant_adds_each_tasks_own_expert_to_the_mean_of_all():
    # AdaTT-sp with one expert per task: the residual is the task's own expert, with weight 1.
    model = build_model("adatt", input_dim=6, tasks=["a", "b", "c"], num_shared_experts=0, num_task_experts=1, num_levels=2)
    _uniform_gates(model)
    x = torch.randn(5, 6)
    (x0, out0), (x1, out1) = _level_outputs(model, x)
    experts = model.levels[0].experts(x0)  # (B, 3, D): task k's expert is k
    torch.testing.assert_close(out0, experts.mean(1, keepdim=True) + experts)
    # No shared experts, so no shared gate: the second level reads one input per task.
    assert out0.shape[1] == 3 and model.levels[0].num_gates == 3
    experts = model.levels[1].experts(x1)
    torch.testing.assert_close(out1, experts.mean(1, keepdim=True) + experts)


def test_learned_residual_weights_a_tasks_own_experts_and_the_shared_gates_the_shared_ones():
    model = build_model("adatt", input_dim=4, tasks=["a", "b"], num_shared_experts=2, num_task_experts=2, num_levels=2)
    _uniform_gates(model)
    first = model.levels[0]
    with torch.no_grad():
        first.task_native.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
        first.shared_native.copy_(torch.tensor([3.0, -0.5]))
    x = torch.randn(7, 4)
    (x0, out0), _ = _level_outputs(model, x)
    e = first.experts(x0)  # experts: a0 a1 b0 b1 s0 s1
    mean = e.mean(1)
    torch.testing.assert_close(out0[:, 0], mean + 0.5 * e[:, 0] - 1.0 * e[:, 1])
    torch.testing.assert_close(out0[:, 1], mean + 2.0 * e[:, 2] + 0.25 * e[:, 3])
    torch.testing.assert_close(out0[:, 2], mean + 3.0 * e[:, 4] - 0.5 * e[:, 5])
    # The last level has no shared gate; its task residuals are learned too, and get gradients.
    assert model.levels[1].shared_native is None and model.levels[1].num_gates == 2
    sum(o.sum() for o in model(x).values()).backward()
    assert first.task_native.grad.abs().sum() > 0 and first.shared_native.grad.abs().sum() > 0


def test_every_gate_may_choose_every_expert_unlike_ple():
    kwargs = dict(input_dim=5, tasks=["a", "b", "c"], num_shared_experts=1, num_task_experts=2)
    x = torch.randn(20, 5)
    for name, exact_zeros in (("adatt", False), ("ple", True)):
        model = build_model(name, **kwargs)
        with model.recording_gates() as gates:
            model(x)
        weights = gates["levels.0.gates"]  # (B, gates, experts)
        assert weights.shape == (20, 4, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(20, 4))
        assert bool((weights == 0).any()) is exact_zeros


def test_without_the_residual_the_fusion_is_the_gates_alone():
    model = build_model("adatt", input_dim=5, tasks=["a", "b"], num_shared_experts=1, num_task_experts=2,
                        native_residual=False)
    assert not [n for n, _ in model.named_parameters() if "native" in n]
    _uniform_gates(model)
    (x0, out0), _ = _level_outputs(model, torch.randn(3, 5))
    experts = model.levels[0].experts(x0)
    torch.testing.assert_close(out0, experts.mean(1, keepdim=True).expand(-1, 3, -1))


@pytest.mark.parametrize("gates, one_node", [(dict(), True), (dict(), False), (dict(gate_type="dselect_k", gate_top_k=2), False)])
def test_trains_on_either_path_and_with_dselect_gates(gates, one_node):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = {"a": x[:, :1].sin(), "b": (x[:, 1:2] * x[:, 2:3])}
    model = build_model("adatt", input_dim=8, tasks=[{"name": "a", "type": "regression"}, {"name": "b", "type": "regression"}],
                        num_shared_experts=1, num_task_experts=2, expert_hidden=(16,), **gates)
    model.small_mixture = one_node
    assert model.takes_small_mixture_path(x) == one_node
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss():
        out = model(x)
        return sum((out[t] - y[t]).pow(2).mean() for t in y)

    start = float(loss().detach())
    for _ in range(150):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert float(loss().detach()) < 0.5 * start


@pytest.mark.parametrize("overrides, key", [
    (dict(num_task_experts=0), "num_task_experts"),
    (dict(native_residual="yes"), "native_residual"),
    (dict(num_levels=0), "num_levels"),
])
def test_invalid_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_model("adatt", input_dim=8, tasks=["a", "b"], **overrides)
