"""Contract tests run over every registered model (adding a model gives it these for free)."""

from pathlib import Path

import pytest
import torch

from mtlkit import ConfigError, TaskSpec
from mtlkit.models import build_model, esmm_tasks, get_model_class, list_models, match_parameter_budget
from mtlkit.training import load_checkpoint, save_checkpoint

ALL_MODELS = list_models()
ANY_TASK_MODELS = [name for name in ALL_MODELS if get_model_class(name).any_number_of_tasks]


def tasks(k, kinds=("binary", "regression")):
    return [TaskSpec(name=f"task{i}", type=kinds[i % len(kinds)]) for i in range(k)]


def example_tasks(name, k=3):
    """Tasks a model accepts: any K of mixed types for most, binary ones for the funnel, the fixed roles for ESMM."""
    cls = get_model_class(name)
    if not cls.any_number_of_tasks:
        return esmm_tasks()
    return tasks(k, cls.task_types or ("binary", "regression"))


def test_registry_has_the_core_models():
    assert {"single_task", "shared_bottom", "cross_stitch", "omoe", "mmoe", "cgc", "ple", "esmm", "esmm_funnel", "aitm"} <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ANY_TASK_MODELS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_output_shapes_for_any_number_of_tasks(name, k):
    model = build_model(name, input_dim=13, tasks=example_tasks(name, k))
    for batch in (1, 7):  # a batch of one must not collapse a dimension
        out = model(torch.randn(batch, 13))
        assert list(out) == [f"task{i}" for i in range(k)]
        for value in out.values():
            assert value.shape == (batch, 1)
            assert torch.isfinite(value).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_parameter_receives_a_gradient(name):
    model = build_model(name, input_dim=9, tasks=example_tasks(name))
    loss = sum(o.pow(2).mean() for o in model(torch.randn(16, 9)).values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("name", ALL_MODELS)
def test_state_dict_and_checkpoint_round_trip(name, tmp_path):
    model = build_model(name, input_dim=6, tasks=example_tasks(name), dropout=0.0)
    path = save_checkpoint(tmp_path / "model.pt", model, metadata={"note": "x"})
    raw = torch.load(path, weights_only=True)  # no arbitrary unpickling needed
    assert raw["model_name"] == name
    loaded, payload = load_checkpoint(path)
    x = torch.randn(4, 6)
    model.eval(), loaded.eval()
    for key, value in model(x).items():
        torch.testing.assert_close(loaded(x)[key], value)
    assert payload["metadata"] == {"note": "x"}


@pytest.mark.parametrize("name", ["omoe", "mmoe", "cgc", "ple"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_gates_sum_to_one(name, k):
    model = build_model(name, input_dim=8, tasks=tasks(k))
    with model.recording_gates() as gates:
        model(torch.randn(10, 8))
    assert gates, "no gate weights were recorded"
    for weights in gates.values():
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert all(bank.last_weights is None for bank in model.gate_banks().values())


def test_cgc_equals_ple_with_one_level():
    cgc = build_model("cgc", input_dim=10, tasks=tasks(3), num_shared_experts=3, num_task_experts=2)
    ple = build_model("ple", input_dim=10, tasks=tasks(3), num_shared_experts=3, num_task_experts=2, num_levels=1)
    ple.load_state_dict(cgc.state_dict())
    x = torch.randn(12, 10)
    for key, value in cgc(x).items():
        torch.testing.assert_close(ple(x)[key], value)


def test_cgc_task_gate_only_sees_own_and_shared_experts():
    model = build_model("cgc", input_dim=5, tasks=tasks(3), num_shared_experts=2, num_task_experts=1)
    x = torch.randn(16, 5, requires_grad=True)
    with model.recording_gates() as gates:
        model(x)
    weights = gates["levels.0.gates"]  # dense over the level's 5 experts: 3 task experts, then 2 shared
    assert weights.shape == (16, 3, 5)
    for k in range(3):
        excluded = [e for e in range(3) if e != k]
        assert (weights[:, k, excluded] == 0).all() and (weights[:, k, [k, 3, 4]] > 0).all()
    # Excluded choices get no gradient, so their weights never move.
    sum(out.sum() for out in model(x).values()).backward()
    grad = model.levels[0].gates.linear.weight.grad.view(5, 3, 5)
    assert (grad[:, 0, 1:3] == 0).all() and (grad[:, 0, [0, 3, 4]] != 0).any()


def test_ple_loads_state_dicts_from_before_one_gate_bank_per_level():
    # Saved by mtlkit at commit 03121bf, when a level had a task gate bank over each task's own choices
    # and a separate shared gate: the same model must come back, outputs included.
    saved = torch.load(Path(__file__).parent / "data" / "ple_cgc_two_gate_banks.pt", weights_only=True)
    for name in ("ple", "cgc"):
        entry = saved[name]
        model = build_model(name, input_dim=6, tasks=["a", "b", "c"], expert_hidden=(5,), tower_hidden=(4,),
                            **entry["options"]).eval()
        model.load_state_dict(entry["state_dict"])
        with torch.no_grad():
            outputs = model(saved["x"])
        for task, expected in entry["outputs"].items():
            torch.testing.assert_close(outputs[task], expected, rtol=1e-6, atol=1e-7)


def test_ple_levels_are_stacked():
    model = build_model("ple", input_dim=10, tasks=tasks(2), num_levels=3)
    assert len(model.levels) == 3
    # Two task gates plus a shared gate below the last level, the task gates alone in it.
    assert [level.num_gates for level in model.levels] == [3, 3, 2]
    # Upper levels read the lower level's fused outputs, one per task plus the shared one.
    assert model.levels[1].experts.linears[0].in_features == model.levels[0].output_dim


def test_omoe_with_one_expert_is_shared_bottom():
    omoe = build_model("omoe", input_dim=7, tasks=tasks(3), num_experts=1, expert_hidden=(12,))
    bottom = build_model("shared_bottom", input_dim=7, tasks=tasks(3), bottom_hidden=(12,))
    state = {k.replace("experts.", "bottom."): v for k, v in omoe.state_dict().items() if not k.startswith("gates.")}
    bottom.load_state_dict(state)
    x = torch.randn(9, 7)
    for key, value in omoe(x).items():
        torch.testing.assert_close(bottom(x)[key], value)


def test_mmoe_parameter_count_matches_the_formula():
    model = build_model("mmoe", input_dim=100, tasks=["a", "b"], num_experts=8, expert_hidden=(16,), tower_hidden=(8,))
    experts = 8 * (100 * 16 + 16)
    gates = 2 * (100 * 8 + 8)
    towers = 2 * (16 * 8 + 8 + 8 + 1)
    assert model.count_parameters() == experts + gates + towers


def test_shared_bottom_sized_to_mmoe_budget():
    target = build_model("mmoe", input_dim=100, tasks=["a", "b"]).count_parameters()
    config = match_parameter_budget("shared_bottom", dict(input_dim=100, tasks=["a", "b"]), target, "bottom_hidden")
    size = build_model("shared_bottom", config).count_parameters()
    assert abs(size - target) / target < 0.01
    # Per extra unit a shared bottom gains 100 + 1 + 2 * 8 weights; the match is the closest width.
    assert abs(size - target) <= (100 + 1 + 16) / 2 + 1


def test_predict_gives_probabilities_for_binary_tasks():
    model = build_model("mmoe", input_dim=4, tasks=[TaskSpec("click", "binary"), TaskSpec("time", "regression")])
    pred = model.predict(torch.randn(50, 4) * 10)
    assert pred["click"].shape == (50,)
    assert ((pred["click"] > 0) & (pred["click"] < 1)).all()
    assert model.training  # predict restores the mode


@pytest.mark.parametrize("overrides, key", [
    (dict(num_experts=0), "num_experts"),
    (dict(expert_hidden=[]), "expert_hidden"),
    (dict(expert_hidden=[16, 0]), "expert_hidden"),
    (dict(tower_hidden=[-1]), "tower_hidden"),
    (dict(dropout=1.5), "dropout"),
    (dict(norm="group"), "norm"),
    (dict(gate_temperature=0), "gate_temperature"),
    (dict(input_dim=0), "input_dim"),
    (dict(num_expert=8), "num_expert"),
    (dict(tasks=[]), "tasks"),
    (dict(tasks=["a", "a"]), "unique"),
    (dict(tasks=[{"name": "a", "type": "ranking"}]), "ranking"),
])
def test_invalid_configs_name_the_key(overrides, key):
    config = dict(input_dim=8, tasks=["a", "b"])
    config.update(overrides)
    with pytest.raises(ConfigError, match=key):
        build_model("mmoe", config)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="mmoe"):
        build_model("mmeo", input_dim=3, tasks=["a"])


@pytest.mark.parametrize("overrides, key", [
    (dict(num_shared_experts=0, num_task_experts=0), "num_shared_experts"),
    (dict(num_levels=0), "num_levels"),
])
def test_invalid_ple_configs(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_model("ple", input_dim=8, tasks=["a", "b"], **overrides)


def test_ple_without_shared_experts_or_without_task_experts():
    for shared, own in [(0, 2), (3, 0)]:
        model = build_model("ple", input_dim=5, tasks=tasks(2), num_shared_experts=shared, num_task_experts=own)
        assert model(torch.randn(3, 5))["task0"].shape == (3, 1)


def test_cross_stitch_starts_near_separate_networks_and_learns_its_units():
    model = build_model("cross_stitch", input_dim=6, tasks=tasks(3), bottom_hidden=[5, 4], self_weight=1.0)
    # With self_weight 1 the units are the identity: each task sees only its own network.
    torch.testing.assert_close(model.stitches[0], torch.eye(3))
    x = torch.randn(8, 6)
    sum(o.sum() for o in model(x).values()).backward()
    assert model.stitches.grad is not None and model.stitches.grad.abs().sum() > 0
    mixed = build_model("cross_stitch", input_dim=6, tasks=tasks(3), self_weight=0.9)
    torch.testing.assert_close(mixed.stitches[0].sum(1), torch.ones(3))
