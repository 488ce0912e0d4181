import math

import pytest
import torch

from mtlkit import ConfigError, DataError, TaskSpec
from mtlkit.data import MultiTaskTensors, make_synthetic
from mtlkit.models import build_model
from mtlkit.objectives import DynamicWeighting, UncertaintyWeighting, build_weighting, task_losses
from mtlkit.training import Trainer, TrainerConfig, evaluate


def synthetic_splits(rows=3000, seed=0, **kw):
    data = make_synthetic(correlation=0.8, num_rows=rows, input_dim=20, num_sine_terms=2, seed=seed, **kw)
    tensors = data.to_tensors()
    return data.tasks, tensors.split([0.8, 0.2], seed=seed)


def train_once(seed=0, steps=60, **config):
    tasks, (train, valid) = synthetic_splits()
    torch.manual_seed(seed)
    model = build_model("mmoe", input_dim=20, tasks=tasks, num_experts=4, dropout=0.1)
    options = dict(max_steps=steps, max_epochs=None, eval_every=20, batch_size=64, seed=seed, progress=False)
    options.update(config)
    result = Trainer(model, TrainerConfig(**options)).fit(train, valid)
    return model, result


def test_same_seed_same_numbers():
    model_a, result_a = train_once(seed=5)
    model_b, result_b = train_once(seed=5)
    assert result_a.history == result_b.history
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    _, result_c = train_once(seed=6)
    assert result_c.history != result_a.history


@pytest.mark.parametrize("weighting, gates", [("fixed", {}), ("famo", dict(gate_type="dselect_k", gate_top_k=2, gate_entropy_weight=0.1))])
def test_a_loop_of_train_steps_is_fit(weighting, gates):
    """``Trainer.train_step`` over the batches fit would draw (same generator, same seed) leaves the
    same weights and the same mean losses as ``fit``: fit's step is the public one. FAMO updates its
    weights after each step; DSelect-k gates add an auxiliary loss."""
    tasks, (train, _) = synthetic_splits(rows=600)
    config = TrainerConfig(max_steps=10, max_epochs=None, eval_every=10, batch_size=64, seed=3, progress=False,
                           weighting=weighting)

    def model():
        torch.manual_seed(0)
        return build_model("mmoe", input_dim=20, tasks=tasks, num_experts=4, dropout=0.1, **gates)

    fitted = model()
    fitting = Trainer(fitted, config)
    history = fitting.fit(train).history
    stepped = model()
    trainer = Trainer(stepped, config)
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(3)
    two_epochs = [b for _ in range(2) for b in train.batches(64, shuffle=True, generator=generator)]  # 8 batches each
    batches = two_epochs[:10]
    steps = [trainer.train_step(batch) for batch in batches]
    for (name, a), (_, b) in zip(fitted.state_dict().items(), stepped.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(trainer.weighting.state_dict(), fitting.weighting.state_dict(), rtol=0, atol=0)  # FAMO's logits
    for task in tasks:
        losses = torch.stack([step.tasks[task.name] for step in steps])
        assert not losses.requires_grad
        assert [r["loss"] for r in history if r["task"] == task.name] == pytest.approx([losses.mean().item()], rel=1e-6)
    auxiliary = [step.auxiliary for step in steps]
    assert all(a is None for a in auxiliary) if not gates else all(a.ndim == 0 and not a.requires_grad for a in auxiliary)


def test_training_reduces_the_validation_loss():
    tasks, (train, valid) = synthetic_splits()
    model = build_model("mmoe", input_dim=20, tasks=tasks, num_experts=4)
    before = evaluate(model, valid, model.tasks)
    Trainer(model, TrainerConfig(max_epochs=15, batch_size=64, patience=None, progress=False, learning_rate=3e-3)).fit(train, valid)
    after = evaluate(model, valid, model.tasks)
    for task in before:
        assert after[task]["loss"] < 0.5 * before[task]["loss"]


def test_history_has_every_task_and_split():
    _, result = train_once(steps=40)
    splits = {(r["split"], r["task"]) for r in result.history}
    assert splits == {(s, t) for s in ("train", "valid") for t in ("y1", "y2")}
    assert sorted({r["step"] for r in result.history}) == [20, 40]


def test_early_stopping_restores_the_best_weights():
    tasks, (train, valid) = synthetic_splits()
    model = build_model("shared_bottom", input_dim=20, tasks=tasks)
    # A learning rate this large diverges after a few evaluations, so patience must trigger.
    config = TrainerConfig(max_steps=2000, max_epochs=None, eval_every=10, patience=3, batch_size=32,
                           learning_rate=0.3, progress=False)
    result = Trainer(model, config).fit(train, valid)
    valid_losses = {r["step"]: r for r in result.history if r["split"] == "valid"}
    assert result.stopped_early and result.steps < 2000
    best = min(valid_losses, key=lambda s: sum(r["loss"] for r in result.history if r["split"] == "valid" and r["step"] == s))
    assert result.best_step == best
    restored = evaluate(model, valid, model.tasks)
    expected = result.final("valid")
    for task in restored:
        assert restored[task]["loss"] == pytest.approx(expected[task]["loss"], rel=1e-6)


def test_monitor_on_a_metric():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g)
    y = torch.stack([(x[:, 0] > 0).float(), x[:, 1]], 1)
    tasks = [TaskSpec("click", "binary"), TaskSpec("time", "regression")]
    data = MultiTaskTensors(x, y, ["click", "time"])
    train, valid = data.split([0.7, 0.3])
    model = build_model("mmoe", input_dim=5, tasks=tasks, num_experts=2)
    result = Trainer(model, TrainerConfig(max_epochs=5, monitor="click/auc", progress=False)).fit(train, valid)
    assert 0.5 < result.best_value <= 1.0
    assert result.final("valid")["click"]["auc"] == result.best_value
    with pytest.raises(ConfigError, match="monitor"):
        Trainer(model, TrainerConfig(max_epochs=1, monitor="click/ndcg", progress=False)).fit(train, valid)


def test_monitor_on_the_mean_of_a_metric_over_tasks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 5, generator=g)
    y = torch.stack([(x[:, 0] > 0).float(), (x[:, 1] + x[:, 2] > 0).float(), x[:, 3]], 1)
    tasks = [TaskSpec("click", "binary"), TaskSpec("buy", "binary"), TaskSpec("time", "regression")]
    train, valid = MultiTaskTensors(x, y, ["click", "buy", "time"]).split([0.7, 0.3])
    model = build_model("mmoe", input_dim=5, tasks=tasks, num_experts=2)
    result = Trainer(model, TrainerConfig(max_epochs=4, monitor="mean/auc", progress=False)).fit(train, valid)
    by_step = {}
    for row in result.history:
        if row["split"] == "valid" and "auc" in row:
            by_step.setdefault(row["step"], []).append(row["auc"])
    means = {step: sum(v) / len(v) for step, v in by_step.items()}
    assert all(len(v) == 2 for v in by_step.values())  # the regression task reports no AUC
    assert result.best_value == pytest.approx(max(means.values())) and result.best_step == max(means, key=means.get)
    with pytest.raises(ConfigError, match="no task reports 'accuracy'"):
        Trainer(model, TrainerConfig(max_epochs=1, monitor="mean/accuracy", progress=False)).fit(train, valid)


def test_monitor_on_group_auc():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 5, generator=g)
    data = MultiTaskTensors(x, (x[:, :1] + 0.5 * torch.randn(900, 1, generator=g) > 0).float(), ["click"])
    train, valid = data.split([0.6, 0.4])
    users = torch.arange(len(valid)) % 30
    model = build_model("mmoe", input_dim=5, tasks=[TaskSpec("click")], num_experts=2)
    result = Trainer(model, TrainerConfig(max_epochs=4, monitor="click/gauc", progress=False)).fit(train, valid, valid_groups=users)
    gaucs = [r["gauc"] for r in result.history if r["split"] == "valid"]
    assert len(gaucs) == 4 and result.best_value == max(gaucs) and 0.5 < result.best_value <= 1.0
    with pytest.raises(DataError, match="valid_groups.*360.*359"):
        Trainer(model, TrainerConfig(max_epochs=1, progress=False)).fit(train, valid, valid_groups=users[1:])


@pytest.mark.parametrize("schedule, warmup", [("constant", 0), ("constant", 4), ("linear", 0), ("cosine", 4)])
def test_learning_rate_schedules(schedule, warmup):
    """The rate each step used: a linear rise over the warm-up, then constant, linear or cosine to 0."""
    x = torch.randn(1000, 5)
    model = build_model("mmoe", input_dim=5, tasks=[TaskSpec("y", "regression")])
    trainer = Trainer(model, TrainerConfig(max_steps=20, batch_size=100, progress=False, learning_rate=0.01,
                                           lr_schedule=schedule, warmup_steps=warmup))
    used = []
    trainer._optimizer_step = (lambda step: lambda: (used.append(trainer.optimizer.param_groups[0]["lr"]), step()))(
        trainer._optimizer_step)
    trainer.fit(MultiTaskTensors(x, x[:, :1], ["y"]))
    expected = []
    for step in range(20):
        if step < warmup:  # torch's LinearLR: from 1 / warmup of the rate, reaching it at step ``warmup``
            expected.append(0.01 * (1 / warmup + (1 - 1 / warmup) * step / warmup))
            continue
        progress = (step - warmup) / (20 - warmup)
        expected.append(0.01 * {"constant": 1.0, "linear": 1 - progress, "cosine": (1 + math.cos(math.pi * progress)) / 2}[schedule])
    assert used == pytest.approx(expected, abs=1e-9)
    # Without a schedule Adam's kernel is called directly; a scheduler wraps Optimizer.step.
    assert ("step" in vars(trainer.optimizer)) == (schedule != "constant" or warmup > 0)


def test_missing_labels_are_excluded_from_loss():
    outputs = {"a": torch.tensor([[0.0], [1.0], [2.0]]), "b": torch.tensor([[1.0], [1.0], [1.0]])}
    labels = torch.tensor([[0.0, float("nan")], [float("nan"), float("nan")], [1.0, float("nan")]])
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]
    losses = task_losses(outputs, labels, ~torch.isnan(labels), tasks)
    assert losses["a"].item() == pytest.approx((0.0 + 1.0) / 2)
    assert losses["b"].item() == 0.0  # no labelled row: exactly zero, not NaN


def test_trainer_handles_partially_labelled_tasks():
    x = torch.randn(400, 6)
    y = torch.stack([x[:, 0], x[:, 1]], 1)
    y[::2, 1] = float("nan")  # task b labelled on half the rows
    data = MultiTaskTensors(x, y, ["a", "b"])
    model = build_model("mmoe", input_dim=6, tasks=[TaskSpec("a", "regression"), TaskSpec("b", "regression")])
    result = Trainer(model, TrainerConfig(max_epochs=3, progress=False)).fit(data, data)
    scores = result.final("valid")
    assert scores["b"]["count"] == 200 and scores["a"]["count"] == 400
    assert all(math.isfinite(r["loss"]) for r in result.history)


@pytest.mark.parametrize("missing", [False, True])
def test_shuffled_batches_carry_their_rows_labels_and_masks(missing):
    x = torch.arange(30, dtype=torch.float32).view(10, 3)
    y = torch.stack([x[:, 0], -x[:, 0]], 1)
    if missing:
        y[::3, 1] = float("nan")
    weight = torch.arange(10, dtype=torch.float32) + 0.5
    data = MultiTaskTensors(x, y, ["a", "b"], sample_weight=weight)
    # Every tensor of a batch must hold the same rows: inputs, labels, masks and weights.
    batches = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b.labels) for b in batches] == [4, 4, 2]
    rows = torch.cat([b.inputs[:, 0] for b in batches]).long() // 3
    assert sorted(rows.tolist()) == list(range(10))
    for batch in batches:
        index = (batch.inputs[:, 0] // 3).long()
        torch.testing.assert_close(batch.labels, y[index], equal_nan=True)
        assert torch.equal(batch.label_mask, ~torch.isnan(y[index]))
        assert torch.equal(batch.sample_weight, weight[index])
        assert batch.all_labelled is not missing
    kept = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert [len(b.labels) for b in kept] == [4, 4]
    for batch in kept:
        assert torch.equal(batch.sample_weight, weight[(batch.inputs[:, 0] // 3).long()])


def test_a_dataset_moves_whole_and_counts_its_bytes():
    x = {"dense": torch.randn(10, 3), "categorical": torch.randint(0, 5, (10, 2))}
    data = MultiTaskTensors(x, torch.randn(10, 2), ["a", "b"], sample_weight=torch.ones(10))
    assert data.to("cpu") is data and data.device == torch.device("cpu")
    assert data.nbytes == 10 * 3 * 4 + 10 * 2 * 8 + 10 * 2 * 4 + 10 * 2 * 1 + 10 * 4
    moved = data.to("meta")  # any other device: every tensor goes, mask and weights included
    assert {t.device.type for t in (moved.inputs["dense"], moved.inputs["categorical"], moved.labels,
                                    moved.label_mask, moved.sample_weight)} == {"meta"}
    assert moved.subset(torch.tensor([1, 3])).labels.shape == (2, 2)  # a host index is moved to the data


def test_evaluate_runs_where_the_model_is_by_default():
    tasks, (train, valid) = synthetic_splits()
    model = build_model("mmoe", input_dim=20, tasks=tasks, num_experts=4)
    assert evaluate(model, valid, tasks) == evaluate(model, valid, tasks, device="cpu")
    with pytest.raises(RuntimeError):  # the meta device holds no numbers: proof the default followed the model
        evaluate(model.to("meta"), valid, tasks)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_asking_for_a_gpu_that_is_not_there_is_a_clear_error(device):
    model = build_model("mmoe", input_dim=20, tasks=["a", "b"], num_experts=2)
    with pytest.raises(ConfigError, match=f"training.device: '{device}'.*0 CUDA device"):
        Trainer(model, TrainerConfig(device=device))


def test_task_count_mismatch_is_a_clear_error():
    tasks, (train, valid) = synthetic_splits()
    model = build_model("mmoe", input_dim=20, tasks=["y1", "y2", "y3"])
    with pytest.raises(DataError, match=r"K=3"):
        Trainer(model, TrainerConfig(max_epochs=1, progress=False)).fit(train, valid)


def test_non_finite_inputs_and_labels_are_clear_errors():
    x = torch.randn(10, 3)
    x[4, 2] = float("nan")
    with pytest.raises(DataError, match="row 4"):
        MultiTaskTensors(x, torch.zeros(10, 1), ["a"])
    y = torch.zeros(10, 1)
    y[7, 0] = float("inf")
    with pytest.raises(DataError, match="task 'a'.*row 7"):
        MultiTaskTensors(torch.randn(10, 3), y, ["a"])


def test_finiteness_is_checked_chunk_by_chunk(monkeypatch):
    """The checks scan rows in chunks (no temporary as large as the table): a bad value in a later
    chunk is still found, at its own row and column, and NaN labels stay allowed."""
    import mtlkit.data.tensors as tensors

    monkeypatch.setattr(tensors, "_CHECK_VALUES", 6)  # 2 rows of 3 values per chunk
    x = torch.randn(10, 3)
    x[9, 1] = float("-inf")
    with pytest.raises(DataError, match=r"row 9, column \[1\]"):
        MultiTaskTensors(x, torch.zeros(10, 1), ["a"])
    y = torch.zeros(10, 2)
    y[1, 0] = float("nan")
    y[6, 1] = float("inf")
    with pytest.raises(DataError, match="task 'b'.*row 6"):
        MultiTaskTensors(torch.randn(10, 3), y, ["a", "b"])
    y[6, 1] = float("nan")
    assert MultiTaskTensors(torch.randn(10, 3), y, ["a", "b"]).label_mask.sum() == 18


def test_binary_labels_out_of_range():
    data = MultiTaskTensors(torch.randn(10, 3), torch.full((10, 1), 2.0), ["click"])
    model = build_model("shared_bottom", input_dim=3, tasks=[TaskSpec("click", "binary")])
    with pytest.raises(DataError, match="click.*\\{0, 1\\}"):
        Trainer(model, TrainerConfig(max_epochs=1, progress=False)).fit(data)


def test_a_multiclass_task_beside_binary_and_regression_ones():
    """Class indices as labels, some missing; one cross-entropy over the labelled rows; accuracy
    monitored upwards; predictions are class probabilities."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=g)
    genre = x[:, :3].argmax(1).float()
    genre[::5] = float("nan")
    data = MultiTaskTensors(x, torch.stack([(x[:, 3] > 0).float(), genre, x[:, 4]], 1), ["click", "genre", "time"])
    tasks = [TaskSpec("click"), TaskSpec("genre", "multiclass", num_classes=3), TaskSpec("time", "regression")]
    outputs = {"click": torch.zeros(3000, 1), "genre": torch.randn(3000, 3, generator=g), "time": torch.zeros(3000, 1)}
    labelled = genre.isfinite()
    loss = task_losses(outputs, data.labels, data.label_mask, tasks)["genre"]
    expected = torch.nn.functional.cross_entropy(outputs["genre"][labelled], genre[labelled].long())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    train, valid = data.split([0.8, 0.2], seed=0)
    model = build_model("mmoe", input_dim=6, tasks=tasks, num_experts=4, expert_hidden=[16])
    result = Trainer(model, TrainerConfig(max_epochs=15, batch_size=128, monitor="genre/accuracy", progress=False)).fit(train, valid)
    scores = result.final("valid")["genre"]
    assert scores["count"] == valid.label_mask[:, 1].sum().item() and scores["accuracy"] == result.best_value
    assert max(r["accuracy"] for r in result.history if r["split"] == "valid" and r["task"] == "genre") == result.best_value
    assert scores["accuracy"] > 0.8  # three classes: a third by chance
    probabilities = model.predict(x[:5])["genre"]
    assert probabilities.shape == (5, 3) and torch.allclose(probabilities.sum(1), torch.ones(5))


@pytest.mark.parametrize("spec, message", [
    (dict(name="genre", type="multiclass"), "genre.*num_classes"),
    (dict(name="genre", type="multiclass", num_classes=1), "num_classes.*>= 2"),
    (dict(name="click", type="binary", num_classes=3), "num_classes is for multiclass"),
    (dict(name="genre", type="multiclass", classes=3), "unknown key.*classes"),
])
def test_bad_multiclass_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        TaskSpec.from_dict(spec)


@pytest.mark.parametrize("label, message", [(3.0, r"num_classes 3.*0 \.\. 2.*\[3\.0\]"), (1.5, "class indices"), (-1.0, "class indices")])
def test_multiclass_labels_out_of_range(label, message):
    labels = torch.zeros(10, 1)
    labels[4] = label
    data = MultiTaskTensors(torch.randn(10, 3), labels, ["genre"])
    task = TaskSpec("genre", "multiclass", num_classes=3)
    assert TaskSpec.from_dict(task.to_dict()) == task and task.output_dim == 3
    model = build_model("shared_bottom", input_dim=3, tasks=[task])
    with pytest.raises(DataError, match=message):
        Trainer(model, TrainerConfig(max_epochs=1, progress=False)).fit(data)


@pytest.mark.parametrize("options, key", [
    (dict(learning_rate=0), "learning_rate"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_steps=None, max_epochs=None), "max_steps"),
    (dict(patience=0), "patience"),
    (dict(monitor="auc"), "monitor"),
    (dict(progress="yes"), "progress"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(warmup_steps=-1), "warmup_steps"),
])
def test_bad_trainer_options(options, key):
    with pytest.raises(ConfigError, match=key):
        TrainerConfig(**options)
    with pytest.raises(ConfigError, match="unknown key"):
        TrainerConfig.from_dict({"learnin_rate": 1})


def test_weightings():
    tasks = [TaskSpec("a", weight=2.0), TaskSpec("b")]
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}
    total, weights = build_weighting("fixed", tasks)(losses)
    assert total.item() == 5.0 and weights == {"a": 2.0, "b": 1.0}
    dynamic = DynamicWeighting(tasks, gamma={"a": 0.5})
    dynamic.on_epoch_end(0), dynamic.on_epoch_end(1)
    assert dynamic.weights == {"a": 2.0 * 0.25, "b": 1.0}
    uncertainty = UncertaintyWeighting(tasks)
    assert sum(p.numel() for p in uncertainty.parameters()) == 2
    assert uncertainty(losses)[0].item() == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="weighting"):
        build_weighting("mgda", tasks)


@pytest.mark.parametrize("weighting", ["fixed", "dynamic"])
def test_compile_switch_trains_like_eager_or_falls_back(weighting):
    """PLE through ``compile=True``, an epoch's last batch shorter than the others, and a weighting
    in the graph (fixed) or outside it (dynamic: y1's weight drops to 0.01 after the first epoch, at
    step 8, which moves the losses of step 14 by 0.1-0.6 %): the same training as eager to float32
    rounding, unless compiling is unavailable and it says so."""
    import warnings

    tasks, (train, valid) = synthetic_splits(rows=600)  # 480 training rows: batches of 64, then 32

    def trained(compile: bool):
        torch.manual_seed(0)
        model = build_model("ple", input_dim=20, tasks=tasks, num_levels=2, expert_hidden=[8])
        config = TrainerConfig(max_steps=14, max_epochs=None, eval_every=7, batch_size=64, compile=compile, progress=False,
                               weighting=weighting, weighting_options={"gamma": {"y1": 0.01}} if weighting == "dynamic" else {})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = Trainer(model, config).fit(train, valid)
        return result, [str(w.message) for w in caught if "eagerly" in str(w.message)]

    eager, _ = trained(False)
    compiled, fell_back = trained(True)
    assert compiled.steps == 14 and all(math.isfinite(r["loss"]) for r in compiled.history)
    if not fell_back:
        for a, b in zip(compiled.history, eager.history):
            assert (a["step"], a["split"], a["task"]) == (b["step"], b["split"], b["task"])
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_small_models_step_adam_over_one_flat_buffer_with_the_same_updates():
    from mtlkit.training.optimizer import FLAT_MAX_PARAMETERS, FlatParameters, build_adam

    tasks, (train, _) = synthetic_splits(rows=256)

    def trained(flat: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(3)
        model = build_model("ple", input_dim=20, tasks=tasks, num_levels=2, expert_hidden=[6])
        params = list(model.parameters())
        if flat:
            optimizer, zero_grad, step = build_adam(params, 1e-2, 0.0, torch.device("cpu"))
        else:
            optimizer = torch.optim.Adam(params, lr=1e-2, fused=True)
            zero_grad, step = lambda: optimizer.zero_grad(set_to_none=True), optimizer.step  # noqa: E731
        for batch in train.batches(64):
            loss = sum(task_losses(model(batch.inputs), batch.labels, batch.label_mask, tasks).values())
            zero_grad()
            loss.backward()
            step()
        return model, optimizer

    flat_model, flat_optimizer = trained(flat=True)
    plain_model, _ = trained(flat=False)
    assert len(flat_optimizer.param_groups[0]["params"]) == 1  # one tensor stepped
    buffer = flat_optimizer.param_groups[0]["params"][0]
    for p, q in zip(flat_model.parameters(), plain_model.parameters()):
        assert p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # a view of the buffer
        assert p.grad.untyped_storage().data_ptr() == buffer.grad.untyped_storage().data_ptr()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # Adam's update, up to the kernel's last-element rounding
    torch.manual_seed(3)
    initial = build_model("ple", input_dim=20, tasks=tasks, num_levels=2, expert_hidden=[6]).state_dict()
    assert all(not torch.equal(initial[k], v) for k, v in flat_model.state_dict().items())  # training moved every tensor
    before = {k: v.clone() for k, v in initial.items()}
    model = build_model("ple", input_dim=20, tasks=tasks, num_levels=2, expert_hidden=[6])
    model.load_state_dict(before)
    FlatParameters(list(model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # rebasing keeps the values

    params = list(plain_model.parameters())
    cpu = torch.device("cpu")
    assert FlatParameters.suits(params, 0.0, cpu, distributed=False)
    assert not FlatParameters.suits(params, 1e-4, cpu, distributed=False)  # an ungraded parameter would decay
    assert not FlatParameters.suits(params, 0.0, torch.device("cuda"), distributed=False)
    assert not FlatParameters.suits(params, 0.0, cpu, distributed=True)
    big = [torch.nn.Parameter(torch.zeros(FLAT_MAX_PARAMETERS)), torch.nn.Parameter(torch.zeros(1))]
    assert not FlatParameters.suits(big, 0.0, cpu, distributed=False)


def _train_with_build_adam(tasks, train, weight_decay, via_optimizer_step=False, setup=None):
    from mtlkit.training.optimizer import build_adam

    torch.manual_seed(4)
    model = build_model("mmoe", input_dim=20, tasks=tasks, num_experts=3, expert_hidden=[6])
    optimizer, zero_grad, step = build_adam(list(model.parameters()), 1e-2, weight_decay, torch.device("cpu"))
    after_step = setup(optimizer) if setup else None
    for batch in train.batches(64):
        loss = sum(task_losses(model(batch.inputs), batch.labels, batch.label_mask, tasks).values())
        zero_grad()
        loss.backward()
        optimizer.step() if via_optimizer_step else step()
        if after_step:
            after_step()
    return model


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])  # over one flat buffer, and per parameter
def test_trainer_adam_step_calls_the_fused_kernel_directly_with_adams_numbers(weight_decay, monkeypatch):
    tasks, (train, _) = synthetic_splits(rows=256)
    generic_steps = []
    init_group = torch.optim.Adam._init_group  # run by every Adam.step, never by the direct call
    monkeypatch.setattr(torch.optim.Adam, "_init_group", lambda *a, **k: generic_steps.append(1) or init_group(*a, **k))
    direct = _train_with_build_adam(tasks, train, weight_decay)
    assert len(generic_steps) == 1  # only the first step, which initialises Adam's state
    generic = _train_with_build_adam(tasks, train, weight_decay, via_optimizer_step=True)
    assert len(generic_steps) == 5
    for p, q in zip(direct.parameters(), generic.parameters()):
        assert torch.equal(p, q)


def test_trainer_adam_step_goes_through_optimizer_step_when_something_watches_it():
    import warnings

    tasks, (train, _) = synthetic_splits(rows=256)
    hook_calls = []
    _train_with_build_adam(tasks, train, 0.0, setup=lambda o: o.register_step_post_hook(lambda *_: hook_calls.append(1)) and None)
    assert len(hook_calls) == 4
    # An LR scheduler counts the optimizer's steps by patching its step: the schedule must apply and the
    # scheduler must not warn that the optimizer never stepped.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduled = _train_with_build_adam(tasks, train, 0.0, setup=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.1).step)
    plain = _train_with_build_adam(tasks, train, 0.0)
    assert not all(torch.equal(p, q) for p, q in zip(scheduled.parameters(), plain.parameters()))


def test_models_and_training_on_tensors_leave_pandas_unloaded():
    """pandas and pyarrow (about 70 MB) load only when a table is read or preprocessed."""
    import subprocess
    import sys

    code = ("import sys, mtlkit, mtlkit.models, mtlkit.training, mtlkit.features, mtlkit.data; "
            "print(sorted(m for m in ('pandas', 'pyarrow') if m in sys.modules)); "
            "from mtlkit.features import TablePreprocessor; print('pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True"]


def test_a_diverging_run_stops_with_a_clear_error():
    from mtlkit import TrainingDivergedError
    from mtlkit.data import MultiTaskTensors

    torch.manual_seed(0)
    x = torch.randn(512, 6)
    labels = torch.stack([x[:, 0], torch.full((512,), 1e30)], 1)  # finite, but its squared error is not in float32
    data = MultiTaskTensors(x, labels, ["fine", "huge"])
    model = build_model("mmoe", input_dim=6, tasks=[TaskSpec("fine", "regression"), TaskSpec("huge", "regression")])
    trainer = Trainer(model, TrainerConfig(max_epochs=3, batch_size=128, progress=False))
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 4 \(epoch 1\).*'huge': inf.*learning_rate"):
        trainer.fit(data, data)
    # Caught on the validation rows too, when only they overflow.
    valid = MultiTaskTensors(x, torch.stack([x[:, 0], torch.full((512,), 1e30)], 1), ["fine", "huge"])
    train = MultiTaskTensors(x, torch.stack([x[:, 0], x[:, 1]], 1), ["fine", "huge"])
    with pytest.raises(TrainingDivergedError, match=r"validation loss of task\(s\) \{'huge': inf\}"):
        Trainer(model, TrainerConfig(max_epochs=1, batch_size=128, progress=False)).fit(train, valid)
