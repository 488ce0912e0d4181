import pytest
import torch

from mtlkit.errors import ConfigError
from mtlkit.models import MLP, ExpertBank, GateBank, StackedLinear
from mtlkit.models.layers import StackedMLP


@pytest.mark.parametrize("hidden", [(16,), (32, 8), (7, 5, 3)])
def test_expert_bank_equals_separate_mlps(hidden):
    experts = [MLP(12, hidden) for _ in range(6)]
    bank = ExpertBank(6, 12, hidden)
    bank.load_from_mlps(experts)
    x = torch.randn(33, 12)
    expected = torch.stack([m(x) for m in experts], dim=1)
    assert bank(x).shape == (33, 6, hidden[-1])
    torch.testing.assert_close(bank(x), expected, atol=1e-6, rtol=0)


def test_expert_bank_with_per_expert_inputs_equals_loop():
    groups = [0, 0, 1, 2, 2]
    experts = [MLP(9, (11, 4)) for _ in groups]
    bank = ExpertBank(len(groups), 9, (11, 4), input_groups=groups)
    bank.load_from_mlps(experts)
    x = torch.randn(17, 3, 9)
    expected = torch.stack([m(x[:, g]) for m, g in zip(experts, groups)], dim=1)
    torch.testing.assert_close(bank(x), expected, atol=1e-6, rtol=0)


def test_experts_are_initialised_independently():
    bank = ExpertBank(4, 10, (8,))
    weight = bank.linears[0].weight.view(10, 4, 8)
    for i in range(1, 4):
        assert not torch.allclose(weight[:, 0], weight[:, i])


def test_stacked_linear_modes_agree():
    shared = StackedLinear(3, 5, 4, shared_input=True)
    per_stack = StackedLinear(3, 5, 4, shared_input=False)
    with torch.no_grad():
        for s in range(3):
            per_stack.weight[s].copy_(shared.stack_weight(s))
        per_stack.bias.copy_(shared.bias)
    x = torch.randn(8, 5)
    torch.testing.assert_close(shared(x), per_stack(x.unsqueeze(1).expand(8, 3, 5)))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_stacked_norms_normalise_each_stack(norm):
    net = StackedMLP(3, 6, (5,), norm=norm, activation="identity")
    out = net(torch.randn(64, 6) * 10 + 3)
    if norm == "layer":
        torch.testing.assert_close(out.mean(-1), torch.zeros(64, 3), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out.mean(0), torch.zeros(3, 5), atol=1e-5, rtol=0)


def test_gate_bank_rows_sum_to_one_and_temperature_sharpens():
    gates = GateBank(3, 10, 7, temperature=1.0)
    x = torch.randn(20, 10)
    weights = gates(x)
    assert weights.shape == (20, 3, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(20, 3))
    cold = GateBank(3, 10, 7, temperature=0.1)
    cold.load_state_dict(gates.state_dict())
    assert (cold(x).max(-1).values >= weights.max(-1).values - 1e-6).all()


def test_gate_weights_recorded_only_on_request():
    gates = GateBank(2, 4, 3)
    gates(torch.randn(5, 4))
    assert gates.last_weights is None
    gates.record = True
    out = gates(torch.randn(5, 4))
    assert torch.equal(gates.last_weights, out)


@pytest.mark.parametrize("bad", [(0,), (-3,), (4.5,), ("8",)])
def test_mlp_rejects_bad_sizes(bad):
    with pytest.raises(ConfigError, match="hidden_sizes"):
        MLP(4, bad)


def test_unknown_activation_is_named():
    with pytest.raises(ConfigError, match="activation.*swish"):
        MLP(4, (3,), activation="swish")


@pytest.mark.parametrize("shared_input", [True, False])
def test_gates_over_subsets_of_experts_equal_a_softmax_over_each_subset(shared_input):
    choices = [[0, 3, 4], [1, 3, 4], [0, 1, 2, 3, 4]]
    gates = GateBank(3, 6, 5, shared_input=shared_input, temperature=0.7, choices=choices).double()
    x = torch.randn(11, 6, dtype=torch.float64) if shared_input else torch.randn(11, 3, 6, dtype=torch.float64)
    weights = gates(x)
    for g, chosen in enumerate(choices):
        selector = x if shared_input else x[:, g]
        weight = gates.linear.weight.view(6, 3, 5)[:, g] if shared_input else gates.linear.weight[g]
        logits = (selector @ weight + gates.linear.bias[g]) / 0.7
        expected = torch.zeros(11, 5, dtype=torch.float64)
        expected[:, chosen] = torch.softmax(logits[:, chosen], dim=1)
        torch.testing.assert_close(weights[:, g], expected, rtol=1e-12, atol=1e-15)
    assert gates.num_excluded_parameters() == 4 * (6 + 1)  # four excluded (gate, expert) entries


@pytest.mark.parametrize("choices, message", [([[0], [1]], "one list of experts per gate"),
                                              ([[0], [], [1]], "at least one"), ([[0], [5], [1]], r"\[0, 5\)")])
def test_gate_choices_are_checked(choices, message):
    with pytest.raises(ConfigError, match=message):
        GateBank(3, 4, 5, choices=choices)
