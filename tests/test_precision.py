"""training.precision: bf16 autocast of the training forward (on the CPU here; tests/test_cuda.py on a GPU)."""

import pytest
import torch

from mtlkit import ConfigError, TaskSpec
from mtlkit.data import MultiTaskTensors, make_synthetic
from mtlkit.features import EncoderConfig, FeatureEncoder
from mtlkit.models import ExpertBank, TabularMultiTaskModel, build_model
from mtlkit.models.layers import StackedMLP
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


def test_the_small_mixture_steps_aside_under_autocast_and_large_stacks_stay_fused():
    model = build_model("mmoe", input_dim=100, tasks=["a", "b"])
    x = torch.randn(1024, 100)
    assert model.takes_small_mixture_path(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model.takes_small_mixture_path(x)
        outputs = model(x)
    assert all(v.dtype == torch.bfloat16 for v in outputs.values())
    large = build_model("mmoe", input_dim=100, tasks=["a", "b"], expert_hidden=(256, 128))
    rows = torch.randn(1024, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert large.experts.takes_fused_path(rows)
        assert large.experts(rows).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):  # only bf16 is offered; anything else takes the modules
        assert not large.experts.takes_fused_path(rows)


@pytest.mark.parametrize("input_kind", ["shared", "grouped", "per_stack"])
def test_under_bf16_autocast_a_fused_stack_runs_in_bf16_like_the_modules(input_kind):
    """Under bf16 autocast a fused ReLU stack (shared input, PLE's grouped input, one input per stack) runs
    forward and backward in bf16 on one cast of its input and parameters; its output and every gradient
    match autograd's modules under the same autocast to bf16's precision, the parameters' gradients in
    fp32, and both sit as close to the fp32 result."""
    torch.manual_seed(0)
    batch, width, hidden = 64, 20, (24, 16)
    if input_kind == "grouped":
        groups = [0, 0, 1, 1, 1, 2]
        stack = ExpertBank(len(groups), width, hidden, input_groups=groups)
        x = torch.randn(3, batch, width).transpose(0, 1).requires_grad_()  # strided, like a mixing output
    else:
        stack = StackedMLP(6, width, hidden, shared_input=input_kind == "shared", activate_last=True)
        x = torch.randn((batch, width) if input_kind == "shared" else (batch, 6, width), requires_grad=True)
    stack.FUSED_MIN_ACTIVATIONS = 0  # fused at any size
    params = list(stack.parameters())
    upstream = torch.randn(batch, 6, hidden[-1])

    def run(fused: bool, precision: torch.dtype | None) -> list[torch.Tensor]:
        stack.fused = fused
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            assert stack.takes_fused_path(x) == fused
            out = stack(x)
        assert out.dtype == (precision or torch.float32)
        grads = torch.autograd.grad(out, [x, *params], upstream.to(out.dtype))
        assert all(g.dtype == torch.float32 for g in grads)  # the input's and the parameters' own dtype
        return [out.detach().float(), *grads]

    fused, modules, exact = run(True, torch.bfloat16), run(False, torch.bfloat16), run(False, None)
    for a, b, reference in zip(fused, modules, exact):
        # A ReLU whose input bf16 rounds across 0 changes a gradient element by a whole term, so the
        # comparisons count the elements off by more than rounding instead of taking the largest.
        scale = float(reference.abs().max())
        assert ((a - b).abs() > 0.01 * scale).float().mean() <= 0.01  # as the modules round (mostly bit for bit)
        assert ((a - reference).abs() > 0.05 * scale).float().mean() <= 0.05  # and near fp32's


def test_bf16_first_layer_weight_gradient_is_one_gemm_without_an_expanded_batch():
    """aten's bf16 bmm copies a batch operand expanded with stride 0 once per stack, so under bf16 the
    shared-input first layer's weight gradient is one GEMM over every stack's columns (as on oneDNN),
    not the per-stack bmm of ``x^T`` expanded that fp32 on MKL runs."""
    from benchmarks.machine import GemmRecorder

    torch.manual_seed(0)
    stack = StackedMLP(6, 20, (24, 16), shared_input=True, activate_last=True)
    stack.FUSED_MIN_ACTIVATIONS = 0
    x = torch.randn(64, 20)
    counts = {}
    for precision in (torch.bfloat16, None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            out = stack(x)
        recorder = GemmRecorder()
        with recorder:
            out.float().sum().backward()
        counts[precision] = sum(any(len(st) == 3 and st[0] == 0 for st in strides) for _, _, strides, _ in recorder.calls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stack.takes_fused_path(x)
    assert counts == {torch.bfloat16: 0, None: 1}  # fp32 (MKL here, below oneDNN's size floor) keeps the bmm


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
