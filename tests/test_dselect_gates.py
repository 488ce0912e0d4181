"""DSelect-k gates (Hazimeh et al., NeurIPS 2021) and task-conditioned gates."""

import itertools
import math

import pytest
import torch

from mtlkit import ConfigError
from mtlkit.data import make_synthetic
from mtlkit.models import DSelectKGateBank, GateBank, build_model
from mtlkit.models.dselect_gates import _dselect_ops, _DSelectKWeights, smooth_step
from mtlkit.reports.gate_usage import measure_gate_usage
from mtlkit.training import Trainer, TrainerConfig


def test_smooth_step_is_the_papers_cubic_with_exact_flat_ends():
    width = 0.7
    t = torch.linspace(-1.0, 1.0, 401, dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, width)
    inside = t.abs() < width / 2
    cubic = -2 / width**3 * t**3 + 3 / (2 * width) * t + 0.5
    torch.testing.assert_close(s[inside], cubic[inside])
    assert (s[t <= -width / 2] == 0).all() and (s[t >= width / 2] == 1).all()  # exactly, not nearly
    s.sum().backward()
    assert (t.grad[~inside] == 0).all() and (t.grad[inside] > 0).all()
    # Continuously differentiable: the slope vanishes at both ends of the cubic.
    ends = torch.tensor([-width / 2, width / 2], dtype=torch.float64)
    torch.testing.assert_close(-6 / width**3 * ends**2 + 3 / (2 * width), torch.zeros(2, dtype=torch.float64))


def _paper_weights(bank: DSelectKGateBank, x: torch.Tensor) -> torch.Tensor:
    """The gate written out as in the paper, gate by gate, selector by selector, expert by expert."""
    k, m = bank.top_k, bank.num_digits
    logits = bank.linear(bank.gate_input(x))
    rows, gates = logits.shape[:2]
    out = torch.zeros(rows, gates, bank.code_to_choice.shape[-1], dtype=x.dtype)
    for b, g in itertools.product(range(rows), range(gates)):
        chosen = bank.code_to_choice[g].argmax(-1)[bank.reachable_codes[g] > 0].tolist()
        digits = math.ceil(math.log2(len(chosen))) if len(chosen) > 1 else 0
        z = logits[b, g, : k * m].view(k, m)[:, :digits]
        alpha = torch.softmax(logits[b, g, k * m:], dim=0)
        for i in range(k):
            s = smooth_step(z[i], bank.smooth_step_width)
            for code, expert in enumerate(chosen):
                r = 1.0
                for j in range(digits):
                    r = r * (s[j] if (code >> j) & 1 else 1 - s[j])
                out[b, g, expert] += alpha[i] * r
    return out


@pytest.mark.parametrize("num_choices, choices, shared_input", [
    (8, None, True), (5, None, True), (1, None, True),
    (8, [[0, 1, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7], list(range(8))], True),  # PLE's first level
    (6, [[0, 4, 5], [1, 2, 3, 4, 5]], False),  # a later level: one input per gate
])
def test_dselect_weights_are_the_papers_formula(num_choices, choices, shared_input):
    torch.manual_seed(0)
    gates = 2 if choices is None else len(choices)
    bank = DSelectKGateBank(gates, 5, num_choices, k=3, shared_input=shared_input, choices=choices,
                            smooth_step_width=2.0).double()
    with torch.no_grad():  # away from the near-uniform start, some digits past the cubic region
        bank.linear.weight.normal_(0, 1.0)
    x = torch.randn(6, 5, dtype=torch.float64) if shared_input else torch.randn(6, gates, 5, dtype=torch.float64)
    weights = bank(x)
    torch.testing.assert_close(weights, _paper_weights(bank, x))
    assert (weights >= 0).all()
    if choices is not None:
        for g, chosen in enumerate(choices):
            others = [e for e in range(num_choices) if e not in chosen]
            assert (weights[:, g, others] == 0).all()


@pytest.mark.parametrize("num_choices, choices, shared_input, k", [
    (8, None, True, 2), (5, None, True, 3), (1, None, True, 2), (16, None, True, 1),
    (8, [[0, 1, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7], list(range(8))], True, 2),
    (6, [[0, 4, 5], [1, 2, 3, 4, 5]], False, 3),
])
def test_the_written_out_gate_matches_its_operators_forward_and_backward(num_choices, choices, shared_input, k):
    """The eager gate (one autograd node, backward written out) against the same maths in operators:
    weights, codes and the logits' gradient through either or both (the mixing reads the weights, the
    penalty the codes), and against finite differences."""
    torch.manual_seed(1)
    gates = 2 if choices is None else len(choices)
    bank = DSelectKGateBank(gates, 5, num_choices, k=k, shared_input=shared_input, choices=choices).double()
    structure = bank.selector_structure()
    # Spread wide enough that some digits sit past the cubic region (zero slope) and some inside it.
    logits = (1.5 * torch.randn(gates, k * (bank.num_digits + 1), 7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: _DSelectKWeights.apply(z, *structure), (logits,))
    node, ops = _DSelectKWeights.apply(logits, *structure), _dselect_ops(logits, *structure)[:2]
    for a, b in zip(node, ops):
        torch.testing.assert_close(a, b)
    probes = [torch.randn_like(t) for t in node]
    for used in ([0], [1], [0, 1]) if bank.num_digits else ([0],):  # one expert: constant codes
        grads = [torch.autograd.grad(sum((out[i] * probes[i]).sum() for i in used), logits, retain_graph=True)[0]
                 for out in (node, ops)]
        torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("num_choices, entropy_weight", [(6, 0.0), (8, 0.3), (6, 0.2), (5, 0.1)])
def test_the_penalty_with_its_gradient_is_autograds(num_choices, entropy_weight):
    """What the small-mixture node computes without autograd: the penalty and its gradient by the codes."""
    torch.manual_seed(0)
    bank = DSelectKGateBank(2, 5, num_choices, k=2, entropy_weight=entropy_weight).double()
    with torch.no_grad():
        bank.linear.weight.normal_(0, 1.0)
    codes = _dselect_ops(bank.linear.forward_batch_last(torch.randn(7, 5, dtype=torch.float64)), *bank.selector_structure())[1]
    codes = codes.detach()
    codes[0, 0, 0, 0] = 0.0  # below the logarithm's floor
    leaf = codes.clone().requires_grad_()
    expected = bank.penalty_of(leaf)
    value, gradient = bank.penalty_with_gradient(codes)
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(gradient, torch.autograd.grad(expected, leaf)[0])


def test_compiled_dselect_model_is_one_graph_and_matches_eager():
    torch.manual_seed(0)
    model = build_model("ple", input_dim=6, tasks=["a", "b"], gate_type="dselect_k", gate_top_k=2,
                        num_shared_experts=2, num_task_experts=1, expert_hidden=(4,), tower_hidden=(3,))
    x = torch.randn(12, 6)
    params = list(model.parameters())

    def outputs_and_grads(module):
        out = module(x)
        loss = out["a"].square().mean() + module.auxiliary_loss(out)
        return out["a"], torch.autograd.grad(loss, params)

    eager, compiled = outputs_and_grads(model), outputs_and_grads(torch.compile(model, fullgraph=True, dynamic=False))
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_converged_selectors_pick_at_most_k_experts_and_stop_learning():
    torch.manual_seed(0)
    bank = DSelectKGateBank(2, 4, 8, k=2, smooth_step_width=1.0)
    with torch.no_grad():
        bank.linear.weight.zero_()
        bank.linear.bias.zero_()
        # Digit logits far past +-1/2: gate 0's selectors on codes 0b101 = 5 and 0b011 = 3, gate 1's both on 6.
        bank.linear.bias[0, :6] = torch.tensor([3.0, -3.0, 3.0, 3.0, 3.0, -3.0])
        bank.linear.bias[1, :6] = torch.tensor([-3.0, 3.0, 3.0, -3.0, 3.0, 3.0])
    x = torch.randn(10, 4)
    weights = bank(x)
    assert (weights[:, 0] > 0).sum(-1).eq(2).all() and set(weights[0, 0].nonzero().flatten().tolist()) == {3, 5}
    torch.testing.assert_close(weights[:, 0, [3, 5]], torch.full((10, 2), 0.5))
    assert weights[:, 1].nonzero()[:, 1].eq(6).all()
    weights.pow(2).sum().backward()
    # Converged digits get no gradient; the selector mixture (its softmax logits) still learns.
    k, m = bank.top_k, bank.num_digits
    assert (bank.linear.bias.grad[:, : k * m] == 0).all() and (bank.linear.weight.grad.view(4, 2, -1)[..., : k * m] == 0).all()


def test_the_penalty_is_zero_on_real_experts_and_left_once_per_training_forward():
    torch.manual_seed(0)
    bank = DSelectKGateBank(1, 3, 6, k=2)  # 3 digits, codes 6 and 7 stand for no expert
    assert bank.has_penalty and bank.has_unreachable_codes
    x = torch.randn(20, 3)
    bank.train()
    weights = bank(x)
    near_uniform = bank.take_penalty()
    # Near the uniform start a quarter of each selector sits on the two codes of no expert: 1/(3/4) - 1 per selector.
    assert 2 * (4 / 3 - 1) * 0.9 < near_uniform.item() < 2 * (4 / 3 - 1) * 1.1
    assert bank.take_penalty() is None  # taken once
    torch.testing.assert_close(weights.sum(-1), torch.full((20, 1), 0.75), atol=0.05, rtol=0)
    with torch.no_grad():
        bank.linear.weight.zero_()
        bank.linear.bias[0, :6] = torch.tensor([3.0, 3.0, -3.0, -3.0, 3.0, -3.0])  # codes 3 and 2: real experts
    bank(x)
    assert bank.take_penalty().item() == 0.0
    bank.eval()
    bank(x)
    assert bank.take_penalty() is None  # evaluation leaves nothing
    # A power of two without entropy has nothing to add.
    assert not DSelectKGateBank(1, 3, 8, k=2).has_penalty
    entropic = DSelectKGateBank(1, 3, 8, k=2, entropy_weight=0.5)
    entropic(x)
    uniform_entropy = 2 * math.log(8)  # two selectors, each near uniform over 8 codes
    assert 0.5 * uniform_entropy * 0.95 < entropic.take_penalty().item() <= 0.5 * uniform_entropy


def test_task_conditioned_gates_give_every_row_the_same_weights():
    torch.manual_seed(0)
    for kind in ("softmax", "dselect_k"):
        model = build_model("ple", input_dim=6, tasks=["a", "b"], gate_type=kind, gate_top_k=2 if kind == "dselect_k" else None,
                            gate_conditioning="task")
        with torch.no_grad():
            for bank in model.gate_banks().values():
                bank.linear.bias.normal_()
        x = torch.randn(50, 6)
        assert model.takes_small_mixture_path(x)  # the one-node path takes them too
        with model.recording_gates() as recorded:
            model(x)
        for path, weights in recorded.items():
            assert model.gate_banks()[path].linear.in_features == 0
            torch.testing.assert_close(weights, weights[:1].expand_as(weights))
        loss = sum(o.pow(2).mean() for o in model(x).values())
        loss.backward()
        assert all(bank.linear.bias.grad.abs().sum() > 0 for bank in model.gate_banks().values())


@pytest.mark.parametrize("name", ["omoe", "mmoe", "cgc", "ple"])
def test_dselect_models_train_with_their_penalty_and_save(name, tmp_path):
    from mtlkit.training import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model(name, input_dim=6, tasks=["a", "b"], gate_type="dselect_k", gate_top_k=2, gate_entropy_weight=0.01,
                        **({"num_experts": 5} if "moe" in name else {}))
    assert all(isinstance(bank, DSelectKGateBank) for bank in model.gate_banks().values())
    x = torch.randn(40, 6)
    model.train()
    outputs = model(x)
    penalty = model.auxiliary_loss(outputs)
    assert penalty is not None and penalty > 0
    assert model.auxiliary_loss(outputs) is None  # each forward's penalty is collected once
    sum(o.pow(2).mean() for o in model(x).values()).add(model.auxiliary_loss(outputs)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.numel())
    model.eval()
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    for task, value in model(x).items():
        torch.testing.assert_close(loaded.eval()(x)[task], value)


def test_static_dselect_converges_to_k_experts_per_task_and_logs_its_penalty():
    """The trainer adds the gates' penalty (history's auxiliary_loss), and with some entropy the
    task-conditioned selectors end on at most k experts each: the exact sparsity softmax gates lack."""
    data = make_synthetic(correlation=0.5, num_rows=4_000, seed=0)
    train, valid = data.to_tensors().split([0.8, 0.2], seed=0)
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=100, tasks=data.tasks, num_experts=8, gate_type="dselect_k", gate_top_k=2,
                        gate_conditioning="task", gate_entropy_weight=0.1)
    config = TrainerConfig(max_steps=1200, max_epochs=None, batch_size=128, patience=None, eval_every=400, progress=False,
                           seed=0, learning_rate=3e-3)
    result = Trainer(model, config).fit(train, valid)
    logged = [row["auxiliary_loss"] for row in result.history if row["split"] == "train" and row["task"] == "y1"]
    assert len(logged) == 3 and logged[-1] < logged[0]
    usage = measure_gate_usage(model, (batch.inputs for batch in valid.batches(500)))["gates"]
    assert (usage.experts_per_row <= 2).all() and (usage.experts_per_row >= 1).all()
    scores = result.final("valid")
    assert all(math.isfinite(s["mse"]) for s in scores.values())


@pytest.mark.parametrize("overrides, message", [
    ({"gate_type": "dselect_k"}, "gate_top_k: gate_type dselect_k needs"),
    ({"gate_type": "sparsemax"}, "gate_type: unknown 'sparsemax'"),
    ({"gate_type": "dselect_k", "gate_top_k": 2, "gate_temperature": 2.0}, "gate_temperature: applies to softmax gates only"),
    ({"gate_type": "dselect_k", "gate_top_k": 2, "gate_dropout": 0.1}, "gate_dropout: applies to softmax gates only"),
    ({"gate_entropy_weight": 0.1}, "gate_entropy_weight: applies to gate_type dselect_k only"),
    ({"gate_smooth_step_width": 2.0}, "gate_smooth_step_width: applies to gate_type dselect_k only"),
    ({"gate_type": "dselect_k", "gate_top_k": 2, "gate_smooth_step_width": 0}, "gate_smooth_step_width: expected a number > 0"),
    ({"gate_type": "dselect_k", "gate_top_k": 2, "gate_entropy_weight": -1}, "gate_entropy_weight: expected a number >= 0"),
    ({"gate_type": "dselect_k", "gate_top_k": 9}, "gate_top_k: expected null or an integer from 1"),
    ({"gate_conditioning": "user"}, "gate_conditioning: unknown 'user'"),
])
def test_bad_gate_settings_name_the_key(overrides, message):
    for name in ("mmoe", "ple"):
        with pytest.raises(ConfigError, match=message):
            build_model(name, input_dim=6, tasks=["a", "b"], **overrides)


def test_dselect_counts_only_the_digits_its_gates_use():
    # PLE's task gates choose among 2 + 2 experts (2 digits), the shared gate among 6 (3 digits).
    model = build_model("cgc", input_dim=6, tasks=["a"], num_shared_experts=2, num_task_experts=2, gate_type="dselect_k",
                        gate_top_k=2)
    bank = model.levels[0].gates
    assert bank.num_digits == 2 and bank.num_excluded_parameters() == 0
    ple = build_model("ple", input_dim=6, tasks=["a", "b"], num_shared_experts=2, num_task_experts=2, gate_type="dselect_k",
                      gate_top_k=2)
    first = ple.levels[0].gates  # 6 experts: 3 digits; the task gates use 2 of them
    assert first.num_digits == 3 and first.num_excluded_parameters() == 2 * 2 * (6 + 1)
    assert isinstance(first, GateBank)  # reports and gate_banks() find it like a softmax bank

