"""STEM: task-specific and shared embedding views, all-expert gates, and the gradient stops."""

import dataclasses

import pytest
import torch

from mtlkit import ConfigError
from mtlkit.features import EncoderConfig, FeatureEncoder
from mtlkit.models import TabularMultiTaskModel, build_model, build_tabular_model
from mtlkit.training import load_checkpoint, save_checkpoint

from forward_hooks import inputs_and_outputs
from in_process import run_example

ENCODER = EncoderConfig(num_dense=2, categorical_cardinalities=(5, 7), categorical_embedding_dims=(3, 3),
                        multi_valued_cardinalities=(4,), multi_valued_embedding_dims=(2,), multi_valued_pooling=("mean",))


def _inputs(rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"dense": torch.randn(rows, 2, generator=g),
            "categorical": torch.stack([torch.randint(0, 5, (rows,), generator=g), torch.randint(0, 7, (rows,), generator=g)], 1),
            "multi_valued": torch.randint(-1, 4, (rows, 1, 3), generator=g)}


def _level_io(model, x):
    """Each level's input, its gates' input and its output, in one forward."""
    modules = [m for level in model.levels for m in (level, level.gates)]
    seen = inputs_and_outputs(model, x, modules)
    return [dict(h=level[0], out=level[1], selector=gates[0], weights=gates[1]) for level, gates in zip(seen[::2], seen[1::2])]


def test_encoder_views_hold_separate_embeddings_and_the_same_dense_features():
    torch.manual_seed(0)
    encoder = FeatureEncoder(dataclasses.replace(ENCODER, views=3))
    inputs = _inputs()
    out = encoder(inputs)
    assert out.shape == (6, 3, ENCODER.output_dim) and encoder.output_dim == 2 + 3 + 3 + 2
    table = encoder.groups[0].weight  # both columns (width 3) in one table, 3 views side by side
    assert table.shape == (5 + 7, 9)
    mv_table = encoder.multi_valued[0].weight
    codes = inputs["multi_valued"][:, 0]
    present = (codes >= 0).float().unsqueeze(-1)
    for v in range(3):
        torch.testing.assert_close(out[:, v, :2], inputs["dense"])
        view = table[:, 3 * v:3 * v + 3]
        torch.testing.assert_close(out[:, v, 2:5], view[inputs["categorical"][:, 0]])
        torch.testing.assert_close(out[:, v, 5:8], view[5 + inputs["categorical"][:, 1]])
        pooled = (mv_table[codes.clamp_min(0), 2 * v:2 * v + 2] * present).sum(1) / present.sum(1).clamp_min(1)
        torch.testing.assert_close(out[:, v, 8:], pooled)
    assert not torch.equal(out[:, 0, 2:], out[:, 1, 2:])  # the views' embeddings differ


def test_one_view_is_the_plain_encoder():
    torch.manual_seed(0)
    plain = FeatureEncoder(ENCODER)
    torch.manual_seed(0)
    one = FeatureEncoder(dataclasses.replace(ENCODER, views=1))
    inputs = _inputs()
    torch.testing.assert_close(one(inputs), plain(inputs))
    assert one(inputs).shape == (6, ENCODER.output_dim)
    assert EncoderConfig.from_dict({k: v for k, v in ENCODER.to_dict().items() if k != "views"}).views == 1  # older runs
    with pytest.raises(ConfigError, match="encoder.views"):
        dataclasses.replace(ENCODER, views=0)


def test_a_level_mixes_every_expert_with_gates_reading_their_task_view_plus_the_shared_one():
    torch.manual_seed(0)
    model = build_model("stem", input_dim=5, tasks=["a", "b"], num_shared_experts=2, num_task_experts=1, num_levels=2,
                        expert_hidden=(4,))
    x = torch.randn(7, 3, 5)  # views a, b, shared
    first, second = _level_io(model, x)
    level = model.levels[0]
    # Task experts read their own view, the shared experts the shared view.
    experts = level.experts(x)
    torch.testing.assert_close(experts[:, 0], level.experts(x[:, [0, 0, 0]])[:, 0])
    torch.testing.assert_close(experts[:, 1], level.experts(x[:, [1, 1, 1]])[:, 1])
    torch.testing.assert_close(experts[:, 2:], level.experts(x[:, [2, 2, 2]])[:, 2:])
    # Gates: a's reads view a + shared, b's view b + shared, the shared gate the shared view.
    torch.testing.assert_close(first["selector"], torch.stack([x[:, 0] + x[:, 2], x[:, 1] + x[:, 2], x[:, 2]], 1))
    weights = first["weights"]
    assert weights.shape == (7, 3, 4) and bool((weights > 0).all())  # every gate over all 4 experts
    torch.testing.assert_close(first["out"], torch.einsum("bge,bed->bgd", weights, experts))
    # The last level has no shared gate: one output per task, for the towers.
    assert second["out"].shape == (7, 2, 4) and second["selector"].shape == (7, 2, 4)


def test_a_plain_input_is_every_view():
    torch.manual_seed(0)
    model = build_model("stem", input_dim=5, tasks=["a", "b", "c"], num_levels=1)
    x = torch.randn(4, 5)
    out = model(x)
    for name, value in model(x.unsqueeze(1).expand(-1, 4, -1).contiguous()).items():
        torch.testing.assert_close(out[name], value)
    with pytest.raises(ValueError, match=r"\(B, 4, 5\)"):
        model(torch.randn(4, 3, 5))


def _view_gradients(stop_gradient: bool):
    """Gradient of task a's loss on each embedding view's columns of the table, for one-level STEM."""
    torch.manual_seed(0)
    model = build_tabular_model("stem", ENCODER, ["a", "b"], {"num_levels": 1, "num_shared_experts": 1, "num_task_experts": 1,
                                                              "stop_gradient": stop_gradient})
    model(_inputs())["a"].pow(2).sum().backward()
    grad = model.encoder.groups[0].weight.grad
    return [grad[:, 3 * v:3 * v + 3].abs().sum().item() for v in range(3)], model


def test_a_tasks_loss_does_not_train_the_other_tasks_experts_or_embeddings():
    (own, other, shared), model = _view_gradients(stop_gradient=True)
    assert own > 0 and shared > 0 and other == 0
    experts = model.backbone.levels[0].experts
    for linear in experts.linears:  # experts a, b, shared: b's untouched by a's loss
        assert linear.weight.grad[1].abs().sum() == 0 and linear.weight.grad[[0, 2]].abs().sum() > 0
    # b's experts still shape a's prediction, and a's gate learns how much to take from them.
    assert model.backbone.levels[0].gates.linear.weight.grad.abs().sum() > 0
    (_, other, _), _ = _view_gradients(stop_gradient=False)
    assert other > 0


@pytest.mark.parametrize("experts, width", [(4, 2), (8, 16), (8, 64)])  # the loop, padded-bmm and bmm paths
def test_the_masked_mix_has_the_gradients_of_mixing_detached_experts(experts, width):
    from mtlkit.models.gates import mix_experts

    g = torch.Generator().manual_seed(experts + width)
    weights = torch.rand(7, 3, experts, generator=g).requires_grad_()
    outputs = torch.randn(7, experts, width, generator=g).requires_grad_()
    mask = (torch.rand(3, experts, generator=g) < 0.5).float()
    upstream = torch.randn(7, 3, width, generator=g)
    # The reference: each gate reads the experts it may not train through a detached copy.
    reference = mix_experts(weights * mask, outputs) + mix_experts(weights * (1 - mask), outputs.detach())
    expected = torch.autograd.grad(reference, (weights, outputs), upstream)
    masked = mix_experts(weights, outputs, mask)
    torch.testing.assert_close(masked, reference)
    for got, want in zip(torch.autograd.grad(masked, (weights, outputs), upstream), expected):
        torch.testing.assert_close(got, want)


def test_stopping_the_gradient_changes_no_output():
    torch.manual_seed(0)
    model = build_model("stem", input_dim=6, tasks=["a", "b"], num_levels=2)
    x = torch.randn(5, 3, 6)
    trained = model(x)
    model.levels[0].stop_gradient = model.levels[1].stop_gradient = False
    for name, value in model(x).items():
        torch.testing.assert_close(trained[name], value)
    with torch.no_grad():
        for name, value in model(x).items():
            torch.testing.assert_close(trained[name], value)


def test_tabular_model_embeds_one_view_per_task_plus_a_shared_one_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_tabular_model("stem", ENCODER, ["a", "b", "c"], {"num_levels": 2})
    assert model.encoder.views == 4 and model.encoder.groups[0].weight.shape[1] == 3 * 4
    assert build_tabular_model("ple", ENCODER, ["a", "b", "c"]).encoder.views == 1
    with pytest.raises(ValueError, match="views"):
        TabularMultiTaskModel(FeatureEncoder(ENCODER), build_model("stem", input_dim=ENCODER.output_dim, tasks=["a", "b"]))
    inputs = _inputs()
    path = save_checkpoint(tmp_path / "stem.pt", model)
    loaded, _ = load_checkpoint(path)
    model.eval(), loaded.eval()
    for name, value in model(inputs).items():
        torch.testing.assert_close(loaded(inputs)[name], value)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("stem", input_dim=8, tasks=[{"name": "a", "type": "regression"}, {"name": "b", "type": "regression"}],
                        num_levels=2, expert_hidden=(16,))
    x = torch.randn(256, 8)
    y = {"a": x[:, :1] * 2 - x[:, 1:2], "b": x[:, 2:3].sin()}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        out = model(x)
        loss = sum((out[t] - y[t]).pow(2).mean() for t in y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.parametrize("overrides, key", [({"num_task_experts": 0}, "num_task_experts"),
                                            ({"num_shared_experts": 0}, "num_shared_experts"),
                                            ({"stop_gradient": "yes"}, "stop_gradient")])
def test_invalid_configs_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_model("stem", input_dim=4, tasks=["a", "b"], **overrides)


def test_the_task_embeddings_example_runs():
    done = run_example("task_embeddings.py", "--seeds", "1", "--rows", "2000", "--models", "stem,mmoe_wide")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "'model': 'stem'" in done.stdout and "'model': 'mmoe_wide'" in done.stdout and "true probabilities" in done.stdout
    done = run_example("task_embeddings.py", "--models", "stem,nope")
    assert done.returncode == 2 and "nope" in done.stderr


def test_compiled_stem_keeps_the_gradient_stops():
    """Under torch.compile (one graph) the masked mix's outputs and gradients are the eager ones."""
    torch.manual_seed(3)
    model = build_model("stem", input_dim=5, tasks=["a", "b"], num_levels=2, num_shared_experts=2, num_task_experts=1,
                        expert_hidden=(6,), tower_hidden=(4,))
    x = torch.randn(16, 3, 5)
    params = list(model.parameters())

    def outputs_and_grads(module):
        out = module(x)
        return out["a"], torch.autograd.grad(out["a"].square().mean(), params, allow_unused=True)

    eager, compiled = outputs_and_grads(model), outputs_and_grads(torch.compile(model, fullgraph=True, dynamic=False))
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # Task a's loss leaves task b's last-level expert untouched (experts a, b, shared, shared), compiled too;
    # below the last level the shared gate's mix, which trains every expert, carries a's gradient to all.
    last = model.levels[1].experts.linears[0].weight
    grad = compiled[1][next(i for i, p in enumerate(params) if p is last)]
    assert grad[1].abs().sum() == 0 and grad[[0, 2, 3]].abs().sum() > 0
