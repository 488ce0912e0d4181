"""The same code on a GPU as on the CPU. Skipped where CUDA is absent (CI has none); on a GPU
machine: ``python -m pytest tests/test_cuda.py`` (the rest of the suite then trains on the GPU too,
since ``training.device`` defaults to ``auto``)."""

import copy
import dataclasses

import pytest
import torch

from mtlkit import TaskSpec
from mtlkit.data import MultiTaskTensors, make_synthetic
from mtlkit.features import EncoderConfig, FeatureEncoder
from mtlkit.models import TabularMultiTaskModel, build_model, esmm_tasks, get_model_class, list_models
from mtlkit.training import Trainer, TrainerConfig, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tasks(name):
    if not get_model_class(name).any_number_of_tasks:
        return esmm_tasks()
    if get_model_class(name).task_types == ("binary",):
        return [TaskSpec("click", "binary"), TaskSpec("cart", "binary"), TaskSpec("buy", "binary")]
    return [TaskSpec("click", "binary"), TaskSpec("watch", "regression"), TaskSpec("buy", "binary")]


def _outputs_and_gradients(model, inputs):
    outputs = model(inputs)
    sum(o.pow(2).mean() for o in outputs.values()).backward()
    return outputs, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_on_both(model, inputs):
    """Forward and every gradient of ``model`` (float64) on the CPU and on the GPU agree."""
    gpu_model = copy.deepcopy(model).cuda()
    gpu_inputs = inputs.cuda() if isinstance(inputs, torch.Tensor) else {k: v.cuda() for k, v in inputs.items()}
    cpu_out, cpu_grads = _outputs_and_gradients(model, inputs)
    gpu_out, gpu_grads = _outputs_and_gradients(gpu_model, gpu_inputs)
    for task, value in cpu_out.items():
        assert gpu_out[task].device.type == "cuda"
        torch.testing.assert_close(gpu_out[task].cpu(), value, rtol=1e-10, atol=1e-12)
    for name, grad in cpu_grads.items():
        assert gpu_grads[name] is not None, name
        torch.testing.assert_close(gpu_grads[name].cpu(), grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("rows", [64, 4096])  # 4096 rows of 256-wide layers: the fused ReLU stacks' path
def test_every_model_computes_on_the_gpu_what_it_computes_on_the_cpu(name, rows):
    fields = {f.name for f in dataclasses.fields(get_model_class(name).config_class)}
    wide = {key: (256, 32) for key in ("expert_hidden", "bottom_hidden", "tower_hidden") if key in fields}
    model = build_model(name, input_dim=40, tasks=_tasks(name), dropout=0.0, **wide).double()
    _assert_same_on_both(model, torch.randn(rows, 40, dtype=torch.float64))


@pytest.mark.parametrize("gates", [{"gate_type": "dselect_k", "gate_top_k": 2},
                                   {"gate_type": "dselect_k", "gate_top_k": 2, "gate_conditioning": "task"},
                                   {"gate_conditioning": "task"}])
@pytest.mark.parametrize("name", ["mmoe", "ple"])
def test_dselect_and_task_conditioned_gates_on_the_gpu(name, gates):
    model = build_model(name, input_dim=40, tasks=_tasks(name), **gates).double()
    _assert_same_on_both(model, torch.randn(64, 40, dtype=torch.float64))


@pytest.mark.parametrize("surgery", ["pcgrad", "mgda", "cagrad", "aligned_mtl", "imtl", "nash_mtl", "upgrad", "gradvac", "db_mtl",
                                     "gradvac:per_layer", "metabalance", "fairgrad", "moco"])
def test_gradient_surgeries_train_on_the_gpu(surgery):
    tasks, (train, valid) = _synthetic()
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=20, tasks=tasks, gate_type="dselect_k", gate_top_k=2, gate_entropy_weight=0.01)
    options = {"gradvac:per_layer": {"per_layer": True}, "metabalance": {"main_task": tasks[0].name}}.get(surgery, {})
    config = TrainerConfig(max_epochs=2, batch_size=256, progress=False, device="cuda", patience=None,
                           gradient_surgery=surgery.split(":")[0], gradient_surgery_options=options,
                           gradient_surgery_scope="shared" if surgery == "metabalance" else "all")
    result = Trainer(model, config).fit(train, valid)
    assert next(model.parameters()).device.type == "cuda"
    for task in tasks:
        losses = [row["loss"] for row in result.history if row["split"] == "valid" and row["task"] == task.name]
        assert len(losses) == 2 and losses[1] < losses[0]


def test_embedding_tables_learn_the_same_on_the_gpu():
    encoder = FeatureEncoder(EncoderConfig(num_dense=3, categorical_cardinalities=[5, 60, 7],
                                           categorical_embedding_dims=[4, 8, 4]))
    model = TabularMultiTaskModel(encoder, build_model("mmoe", input_dim=encoder.output_dim, tasks=_tasks("mmoe"))).double()
    inputs = {"dense": torch.randn(512, 3, dtype=torch.float64),
              "categorical": torch.stack([torch.randint(0, c, (512,)) for c in (5, 60, 7)], 1)}
    _assert_same_on_both(model, inputs)


def _synthetic():
    data = make_synthetic(correlation=0.5, num_rows=3000, input_dim=20, num_sine_terms=2, seed=0)
    return data.tasks, data.to_tensors().split([0.8, 0.2], seed=0)


def test_trainer_keeps_the_table_on_the_gpu_and_learns_what_the_cpu_learns(tmp_path, monkeypatch):
    tasks, (train, valid) = _synthetic()
    moved = []
    original_to = MultiTaskTensors.to
    monkeypatch.setattr(MultiTaskTensors, "to", lambda self, device: moved.append(device) or original_to(self, device))
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model("ple", input_dim=20, tasks=tasks, num_levels=2)
        trainer = Trainer(model, TrainerConfig(max_steps=60, max_epochs=None, eval_every=20, batch_size=128,
                                               progress=False, device=device))
        moved.clear()
        result = trainer.fit(train, valid)
        results[device] = (model, result)
        if device == "cuda":
            assert next(model.parameters()).device.type == "cuda"
            # The training and validation tables, once each (never per batch).
            assert [torch.device(d).type for d in moved].count("cuda") == 2
    cpu, gpu = (results[d][1] for d in ("cpu", "cuda"))
    # Same seed, same batches; float32 sums in another order drift a little over 60 Adam steps.
    for a, b in zip(cpu.history, gpu.history):
        assert (a["step"], a["split"], a["task"]) == (b["step"], b["split"], b["task"])
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    path = save_checkpoint(tmp_path / "gpu.pt", results["cuda"][0])
    loaded, _ = load_checkpoint(path)  # weights_only, onto the CPU
    x = valid.inputs[:50]
    gpu_model = results["cuda"][0].eval()
    with torch.no_grad():
        for task, value in loaded.eval()(x).items():
            torch.testing.assert_close(value, gpu_model(x.cuda())[task].cpu(), rtol=1e-5, atol=1e-6)


def test_compiled_training_on_the_gpu_matches_eager():
    tasks, (train, valid) = _synthetic()
    losses = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = build_model("mmoe", input_dim=20, tasks=tasks, num_experts=4)
        result = Trainer(model, TrainerConfig(max_steps=30, max_epochs=None, eval_every=10, batch_size=256,
                                              progress=False, device="cuda", compile=compile_)).fit(train, valid)
        losses[compile_] = [row["loss"] for row in result.history]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.parametrize("name", ["mmoe", "ple", "aitm"])
def test_bf16_training_on_the_gpu_learns_what_fp32_learns(name):
    tasks, (train, valid) = _synthetic()
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(name, input_dim=20, tasks=tasks)
        seen = []
        linear = next(m for m in model.modules() if type(m).__name__ == "StackedLinear")
        linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        result = Trainer(model, TrainerConfig(max_epochs=3, batch_size=256, progress=False, device="cuda",
                                              precision=precision)).fit(train, valid)
        assert seen[0] == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[precision] = sum(s["loss"] for s in result.final("valid").values())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


@pytest.mark.parametrize("options", [{"weighting": "gradnorm"}, {"weighting": "dwa"}, {"weighting": "uncertainty",
                                                                                        "weighting_learning_rate": 0.01}])
def test_adaptive_weightings_and_resume_on_the_gpu(tmp_path, options):
    tasks, (train, valid) = _synthetic()
    torch.manual_seed(0)
    model = build_model("ple", input_dim=20, tasks=tasks, gate_dropout=0.1)
    config = TrainerConfig(max_epochs=3, batch_size=256, progress=False, device="cuda", patience=None, **options)
    state = tmp_path / "state.pt"
    first = Trainer(model, config).fit(train, valid, state_file=state)
    assert state.is_file() and torch.load(state, weights_only=True)["loop"]["epoch"] == 2
    weights = [row["weight"] for row in first.history if row["split"] == "train"]
    assert all(w == w and w > 0 for w in weights)
    resumed = Trainer(model, dataclasses.replace(config)).fit(train, valid, state_file=state)  # from epoch 2
    assert resumed.steps == first.steps


def test_run_folder_reports_on_the_gpu(tmp_path):
    from mtlkit.experiments.tabular_run import RunConfig, train_run

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tables import SCHEMA, make_table

    make_table(800, seed=0).to_csv(tmp_path / "train.csv", index=False)
    make_table(200, seed=1).to_csv(tmp_path / "test.csv", index=False)
    config = RunConfig(data={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}, schema=SCHEMA,
                       model={"name": "mmoe", "num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]},
                       training={"max_epochs": 2, "batch_size": 64, "progress": False, "device": "cuda"})
    run = train_run(config, tmp_path / "run", progress=False)
    for name in ("gate_usage.json", "gate_usage.png", "calibration.png", "report.md"):
        assert (run / name).stat().st_size > 0, name
