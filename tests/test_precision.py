"""training.precision: bf16 autocast of the training forward (on the CPU here; tests/test_cuda.py on a GPU)."""

import pytest
import torch

from mtlkit import ConfigError, TaskSpec
from mtlkit.data import MultiTaskTensors, make_synthetic
from mtlkit.features import EncoderConfig, FeatureEncoder
from mtlkit.models import TabularMultiTaskModel, build_model
from mtlkit.training import Trainer, TrainerConfig


def test_bad_precision_names_the_key():
    with pytest.raises(ConfigError, match=r"training.precision: expected one of \['fp32', 'bf16'\], got 'fp16'"):
        TrainerConfig(precision="fp16")


@pytest.mark.parametrize("name", ["mmoe", "ple", "shared_bottom", "aitm"])
def test_bf16_runs_the_layers_in_bf16_and_trains_like_fp32(name):
    data = make_synthetic(correlation=0.5, num_rows=6000, seed=0)
    train, valid = data.to_tensors().split([0.8, 0.2], seed=0)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(name, input_dim=100, tasks=data.tasks)
        seen = []
        linear = next(m for m in model.modules() if type(m).__name__ == "StackedLinear")
        linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        trainer = Trainer(model, TrainerConfig(max_epochs=3, batch_size=256, progress=False, precision=precision))
        batch = next(iter(train.batches(256)))
        total, per_task = trainer.batch_objective(batch)
        if precision == "bf16":  # the fused paths (which never call the linear modules) stepped aside
            assert seen and all(dtype == torch.bfloat16 for dtype in seen)
        assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in per_task.values())
        result = trainer.fit(train, valid)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and Adam stay fp32
        losses[precision] = sum(s["loss"] for s in result.final("valid").values())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_the_fused_paths_step_aside_under_autocast():
    model = build_model("mmoe", input_dim=100, tasks=["a", "b"])
    x = torch.randn(1024, 100)
    assert model.takes_small_mixture_path(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model.takes_small_mixture_path(x)
        assert not model.experts.takes_fused_path(torch.randn(4096, 100))
        outputs = model(x)
    assert all(v.dtype == torch.bfloat16 for v in outputs.values())


def test_bf16_with_embeddings_and_compile():
    tasks = [TaskSpec("click", "binary"), TaskSpec("watch", "regression")]
    torch.manual_seed(1)
    inputs = {"dense": torch.randn(2048, 3), "categorical": torch.stack([torch.randint(0, c, (2048,)) for c in (5, 60, 7)], 1)}
    labels = torch.stack([(inputs["dense"][:, 0] > 0).float(), inputs["dense"][:, 1]], 1)
    data = MultiTaskTensors(inputs, labels, ["click", "watch"])
    for compile_model in (False, True):
        torch.manual_seed(0)
        encoder = FeatureEncoder(EncoderConfig(num_dense=3, categorical_cardinalities=[5, 60, 7],
                                               categorical_embedding_dims=[4, 8, 4]))
        model = TabularMultiTaskModel(encoder, build_model("mmoe", input_dim=encoder.output_dim, tasks=tasks))
        before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        result = Trainer(model, TrainerConfig(max_epochs=10, batch_size=256, learning_rate=0.01, progress=False, precision="bf16",
                                              compile=compile_model)).fit(data, data)
        scores = result.final("valid")
        assert scores["click"]["auc"] > 0.99 and scores["watch"]["loss"] < 0.05  # fp32, seeds 0-2: 1.0 and 0.001-0.002
        assert all(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())  # embeddings learn
