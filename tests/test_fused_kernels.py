"""The hand-written backward passes (fused ReLU stacks, gate softmax, mixing, categorical lookup) against autograd's."""

import pytest
import torch

from mtlkit.models import MLP, ExpertBank
from mtlkit.models.fused_mlp import stacked_relu_mlp
from mtlkit.models.gates import _BLAS_BMM, _PAD_MIXING_FROM, _SMALL_MIXING, GateBank, mix_experts
from mtlkit.models.layers import StackedMLP


def _grads(output: torch.Tensor, tensors: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    return list(torch.autograd.grad(output, tensors, upstream, allow_unused=True))


def _assert_fused_equals_module_path(stack: StackedMLP, x: torch.Tensor) -> None:
    """Forward and every gradient (input and parameters) of the fused path equal autograd's
    module-by-module path, in float64 to 1e-12; so does the fused forward without gradients."""
    stack.FUSED_MIN_ACTIVATIONS = 0  # fused at any size
    params = list(stack.parameters())
    fused_out = stack(x)
    fused_grads = _grads(fused_out, [x, *params])
    with torch.inference_mode():
        fused_inference = stack(x)
    stack.fused = False
    plain_out = stack(x)
    plain_grads = _grads(plain_out, [x, *params])
    torch.testing.assert_close(fused_out, plain_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(fused_inference, plain_out.detach(), atol=1e-12, rtol=0)
    for fused, plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, plain, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("hidden", [(6,), (6, 5), (7, 5, 3)])
@pytest.mark.parametrize("activate_last", [True, False])
@pytest.mark.parametrize("width", [9, 7])  # 7 + the constant column is a multiple of 8: the other input-gradient GEMM
def test_fused_relu_stack_matches_autograd(shared_input, hidden, activate_last, width):
    torch.manual_seed(0)
    stack = StackedMLP(4, width, hidden, shared_input=shared_input, activate_last=activate_last).double()
    shape = (11, width) if shared_input else (11, 4, width)
    _assert_fused_equals_module_path(stack, torch.randn(shape, dtype=torch.double, requires_grad=True))


def test_fused_expert_gradients_equal_separate_mlps():
    """The batched experts and a loop over nn.Linear MLPs give the same gradients (float32)."""
    torch.manual_seed(1)
    experts = [MLP(12, (16, 8)) for _ in range(5)]
    bank = ExpertBank(5, 12, (16, 8))
    bank.FUSED_MIN_ACTIVATIONS = 0
    bank.load_from_mlps(experts)
    x = torch.randn(64, 12)
    upstream = torch.randn(64, 5, 8)
    bank(x).backward(upstream)
    torch.stack([m(x) for m in experts], dim=1).backward(upstream)
    for s, mlp in enumerate(experts):
        linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
        for stacked, linear in zip(bank.linears, linears):
            weight_grad = stacked.weight.grad.view(stacked.in_features, 5, -1)[:, s] if stacked.shared_input else stacked.weight.grad[s]
            torch.testing.assert_close(weight_grad, linear.weight.grad.T, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stacked.bias.grad[s], linear.bias.grad, atol=1e-5, rtol=1e-5)


def test_fused_stack_skips_gradients_nobody_needs():
    torch.manual_seed(2)
    stack = StackedMLP(3, 5, (4, 2), shared_input=True)
    stack.FUSED_MIN_ACTIVATIONS = 0
    stack.linears[0].weight.requires_grad_(False)
    x = torch.randn(7, 5)  # no gradient wanted for the input either
    stack(x).sum().backward()
    assert stack.linears[0].weight.grad is None
    assert stack.linears[0].bias.grad is not None and stack.linears[1].weight.grad is not None


def test_fused_stack_gradcheck():
    torch.manual_seed(3)
    x = torch.randn(6, 3, 4, dtype=torch.double, requires_grad=True)
    weights = [torch.randn(3, 4, 5, dtype=torch.double, requires_grad=True), torch.randn(3, 5, 2, dtype=torch.double, requires_grad=True)]
    biases = [torch.randn(3, 5, dtype=torch.double, requires_grad=True), torch.randn(3, 2, dtype=torch.double, requires_grad=True)]

    def fn(x, w0, b0, w1, b1):
        return stacked_relu_mlp(x, [w0, w1], [b0, b1], activate_last=True)

    assert torch.autograd.gradcheck(fn, (x, weights[0], biases[0], weights[1], biases[1]))


def test_fused_path_only_for_large_activations():
    stack = StackedMLP(4, 3, (8, 2))
    stack.FUSED_MIN_ACTIVATIONS = 10 * 4 * 8
    assert "StackedReluMLP" not in type(stack(torch.randn(9, 3)).grad_fn).__name__
    assert "StackedReluMLP" in type(stack(torch.randn(10, 3)).grad_fn).__name__
    # Off a CPU autograd's modules run: on an H200 they were faster (docs/performance-log.md, round 13).
    assert not stack.takes_fused_path(torch.empty(10, 3, device="meta"))


@pytest.mark.parametrize("shared_input", [True, False])
def test_small_stacks_without_gradients_take_the_fused_forward(monkeypatch, shared_input):
    """Below the size threshold a stack trains through autograd's modules, and evaluates through
    the fused forward (plain GEMMs, bias in the ReLU's pass), with the same numbers."""
    import mtlkit.models.fused_mlp as fused_mlp

    torch.manual_seed(6)
    stack = StackedMLP(3, 5, (4, 2), shared_input=shared_input, activate_last=False).double()
    x = torch.randn((7, 5) if shared_input else (7, 3, 5), dtype=torch.double)
    calls = []
    forward = fused_mlp._forward_without_grad
    monkeypatch.setattr(fused_mlp, "_forward_without_grad", lambda *args: calls.append(1) or forward(*args))
    recorded = stack(x)
    assert calls == [] and "StackedReluMLP" not in type(recorded.grad_fn).__name__
    with torch.no_grad():
        evaluated = stack(x)
    with torch.inference_mode():
        served = stack.forward_stack_major(x)
    assert len(calls) == 2
    torch.testing.assert_close(evaluated, recorded.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(served, recorded.detach().transpose(0, 1), atol=1e-12, rtol=0)


def test_other_activations_and_norms_take_the_module_path():
    assert not StackedMLP(2, 3, (4,), activation="gelu").fused
    assert not StackedMLP(2, 3, (4,), norm="layer").fused
    assert not StackedMLP(2, 3, (4,), dropout=0.1).fused


@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_batch_last_gates_match_the_batch_major_softmax(shared_input, temperature):
    """Gates computed as (G, E, B) equal softmax((x W_g + b_g) / T) row by row, with every gradient."""
    torch.manual_seed(4)
    bank = GateBank(3, 6, 8, shared_input=shared_input, temperature=temperature).double()
    x = torch.randn(13, 6, dtype=torch.double) if shared_input else torch.randn(13, 3, 6, dtype=torch.double)
    x.requires_grad_()
    linear = bank.linear
    weights = bank(x)
    reference = torch.softmax(linear(x) / temperature, dim=-1)  # batch-major: (B, G, E)
    torch.testing.assert_close(weights, reference, atol=1e-12, rtol=0)
    tensors = [x, linear.weight, linear.bias]
    for ours, theirs in zip(_grads(weights, tensors), _grads(reference, tensors)):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    # Large logits must not overflow.
    with torch.no_grad():
        assert torch.isfinite(bank(x.detach() * 1e4)).all()


@pytest.mark.parametrize("batch_last", [False, True])
@pytest.mark.parametrize("gates, experts, width, padded", [(2, 8, 16, True), (1, 8, 16, False), (3, 8, 40, False)])
def test_mixing_gradients_match_bmm(gates, experts, width, padded, batch_last):
    small = gates * experts * width <= _SMALL_MIXING
    assert small == (width == 16)  # both backward paths are covered
    assert padded == (_PAD_MIXING_FROM <= gates * experts * width < _BLAS_BMM)  # and both forward paths
    torch.manual_seed(5)
    weights = torch.softmax(torch.randn(9, gates, experts, dtype=torch.double), -1)
    if batch_last:  # as GateBank returns them: a (B, G, E) view of a (G, E, B) tensor
        weights = weights.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    weights.requires_grad_()
    outputs = torch.randn(experts, 9, width, dtype=torch.double).transpose(0, 1).requires_grad_()  # strided, as from the experts
    ours = mix_experts(weights, outputs)
    reference = torch.bmm(weights, outputs)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    for a, b in zip(_grads(ours, [weights, outputs]), _grads(reference, [weights, outputs])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("stacked", [True, False])
def test_layer_matrix_carries_bias_and_constant_column(stacked):
    """``[h, 1] @ matrix`` is ``[h W + b, 1]`` per stack: the next layer's bias rides on that column."""
    from mtlkit.models.fused_mlp import _layer_matrix

    torch.manual_seed(3)
    num_stacks, width_in, width_out = 3, 5, 4
    weight = torch.randn(num_stacks, width_in, width_out, dtype=torch.double)
    bias = torch.randn(num_stacks, width_out, dtype=torch.double)
    h = torch.randn(num_stacks, 7, width_in, dtype=torch.double)
    expected = torch.baddbmm(bias.unsqueeze(1), h, weight)
    h_ones = torch.cat([h, torch.ones(num_stacks, 7, 1, dtype=torch.double)], dim=2)
    if stacked:
        out = torch.bmm(h_ones, _layer_matrix(weight, bias, stacked=True, extend=True))
    else:  # a shared input: the same h for every stack, weights stored [in, S * out]
        shared = weight.transpose(0, 1)  # [in, S, out]
        out = torch.mm(h_ones[0], _layer_matrix(shared, bias, stacked=False, extend=True)).view(7, num_stacks, -1).transpose(0, 1)
        expected = torch.stack([h[0] @ weight[s] + bias[s] for s in range(num_stacks)])
    torch.testing.assert_close(out[..., :width_out], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out[..., width_out], torch.ones(num_stacks, 7, dtype=torch.double), atol=0, rtol=0)


@pytest.mark.parametrize("groups", [[0, 0, 1, 1, 2, 2, 2, 2], [2, 2, 2], [0, 1, 1], [1, 0, 2, 0]])
@pytest.mark.parametrize("hidden", [(6,), (6, 5)])
@pytest.mark.parametrize("width", [9, 7])
def test_grouped_expert_inputs_match_the_gather(groups, hidden, width):
    """PLE's upper levels: experts reading runs of a grouped input through one GEMM per group equal the
    gather-then-batched path, forward and backward (unsorted groups take the gather)."""
    torch.manual_seed(4)
    bank = ExpertBank(len(groups), width, hidden, input_groups=groups).double()
    x = torch.randn(4, 11, width, dtype=torch.double).transpose(0, 1).requires_grad_()  # strided, like a mixing output
    _assert_fused_equals_module_path(bank, x)


def test_forwards_without_gradients_build_no_operands(monkeypatch):
    """Evaluation and prediction run every fused layer on the parameters as stored: no ``[W; b]``
    copy per forward, whose odd GEMM widths cost ESMM's inference a fifth of its time."""
    import mtlkit.models.fused_mlp as fused_mlp
    from mtlkit.models import build_model

    torch.manual_seed(5)
    model = build_model("ple", input_dim=9, tasks=["a", "b"], num_levels=2, expert_hidden=(6, 5)).double()
    model.small_mixture = False  # this tiny PLE would run as one batch-last node (models/small_mixture.py)
    for bank in [m for m in model.modules() if isinstance(m, StackedMLP)]:
        bank.FUSED_MIN_ACTIVATIONS = 0
    x = torch.randn(16, 9, dtype=torch.double)
    builds = []
    build = fused_mlp._operands
    monkeypatch.setattr(fused_mlp, "_operands", lambda *args: builds.append(1) or build(*args))

    recorded = model(x)
    assert len(builds) >= 2  # both levels' experts took the fused path
    builds.clear()
    predicted = model.predict(x)
    with torch.inference_mode():
        served = model(x)
    assert builds == []
    for task in model.tasks:
        expected = recorded[task.name].detach()
        torch.testing.assert_close(served[task.name], expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(predicted[task.name], task.task_type.predict(expected), atol=1e-12, rtol=0)


def test_group_sizes_must_cover_the_stacks():
    with pytest.raises(ValueError, match="sum to the number of stacks"):
        stacked_relu_mlp(torch.zeros(2, 2, 3), [torch.zeros(3, 3, 4)], [torch.zeros(3, 4)], activate_last=True,
                         input_group_sizes=(1, 1))


def test_table_rows_gradient_is_index_select_gradient():
    """The categorical lookup's scatter_add_ backward gives index_add_'s sums, bit for bit (float32)."""
    from mtlkit.features.encoder import table_rows

    torch.manual_seed(5)
    table = torch.randn(13, 4, requires_grad=True)
    rows = torch.randint(0, 13, (200,))  # many repeats per row
    upstream = torch.randn(200, 4)
    (ours,) = torch.autograd.grad(table_rows(table, rows), table, upstream)
    (theirs,) = torch.autograd.grad(table.index_select(0, rows), table, upstream)
    assert torch.equal(ours, theirs)
    double = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: table_rows(t, torch.tensor([0, 5, 5, 2])), (double,))


def _fused_stack_results(stack: StackedMLP, x: torch.Tensor) -> list[torch.Tensor]:
    params = list(stack.parameters())
    out = stack(x)
    with torch.inference_mode():
        inference = stack(x)
    return [out.detach(), inference, *_grads(out, [x, *params])]


def test_onednn_gemms_give_the_stack_mkls_numbers(monkeypatch):
    """With oneDNN for the large GEMMs (the first layer's forward, its weight and input gradients, the
    inference GEMM) the fused stack's forward, inference and every gradient equal MKL's to float32
    rounding, and oneDNN really ran."""
    from mtlkit.models import cpu_gemm

    if not cpu_gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    stack = StackedMLP(8, 271, (64, 32), shared_input=True, activate_last=True)
    stack.FUSED_MIN_ACTIVATIONS = 0
    x = torch.randn(512, 271, requires_grad=True)  # 512 x 272 x 520: above oneDNN's minimum work
    with cpu_gemm.forced_cpu_gemm_library("mkl"):
        expected = _fused_stack_results(stack, x)
    decisions = []
    uses_onednn = cpu_gemm.uses_onednn
    monkeypatch.setattr(cpu_gemm, "uses_onednn", lambda a, b: decisions.append(uses_onednn(a, b)) or decisions[-1])
    with cpu_gemm.forced_cpu_gemm_library("onednn"):
        got = _fused_stack_results(stack, x)
    # The forward, the weight gradient, the input gradient and the inference GEMM.
    assert decisions == [True] * 4
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("input_kind", ["shared", "grouped", "per_stack"])
def test_onednn_batched_and_sliced_gemms_give_the_stack_mkls_numbers(monkeypatch, input_kind):
    """With every GEMM oneDNN can take sent to it (its size floor lifted), also the batched layers (one
    call per stack, written into place by the ReLU, its gradient mask or the bias) and a grouped first
    layer writing column slices, the fused stack's forward, inference and every gradient equal MKL's
    to float32 rounding, and oneDNN ran once per stack of each batched GEMM."""
    from mtlkit.models import cpu_gemm

    if not cpu_gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(cpu_gemm, "_MIN_ONEDNN_WORK", 0)
    torch.manual_seed(0)
    num_stacks, batch, width, hidden = 6, 64, 20, (24, 16, 12)
    stack = StackedMLP(num_stacks, width, hidden, shared_input=input_kind == "shared", activate_last=True)
    groups = (2, 3, 1) if input_kind == "grouped" else None
    shape = {"shared": (batch, width), "grouped": (batch, len(groups or ()), width), "per_stack": (batch, num_stacks, width)}[input_kind]
    x = torch.randn(shape, requires_grad=True)
    params = list(stack.parameters())

    def results() -> list[torch.Tensor]:
        out = stack.fused_forward(x, groups)
        with torch.inference_mode():
            inference = stack.fused_forward(x, groups)
        return [out.detach(), inference, *_grads(out, [x, *params])]

    with cpu_gemm.forced_cpu_gemm_library("mkl"):
        expected = results()
    calls = []
    onednn_matmul = cpu_gemm.onednn_matmul
    monkeypatch.setattr(cpu_gemm, "onednn_matmul", lambda a, b: calls.append(a.shape) or onednn_matmul(a, b))
    with cpu_gemm.forced_cpu_gemm_library("onednn"):
        got = results()
    # Two batched layers, each run forward, backward into its input and at inference: 3 x 2 x 6 calls at
    # least, besides the first layer's.
    assert len(calls) >= 6 * num_stacks
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gemm_into_writes_through_the_pointwise_pass_under_both_libraries(monkeypatch):
    """``matmul_into`` / ``bmm_into`` give ``pointwise(a @ b)`` in the caller's (strided) output under
    either library, the pass told which batch entry it writes (None: the whole output)."""
    from mtlkit.models import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "_MIN_ONEDNN_WORK", 0)
    torch.manual_seed(0)
    a, b = torch.randn(4, 32, 10), torch.randn(4, 10, 7)
    offsets = torch.arange(4.0).view(4, 1, 1)

    def add_offset(src, dst, entry):
        torch.add(src, offsets if entry is None else offsets[entry], out=dst)

    for library in ("mkl", "onednn"):
        with cpu_gemm.forced_cpu_gemm_library(library):
            wide = torch.zeros(32, 4, 9)
            cpu_gemm.bmm_into(a, b, wide[:, :, :7].transpose(0, 1), add_offset)
            torch.testing.assert_close(wide[:, :, :7].transpose(0, 1), a @ b + offsets)
            assert torch.equal(wide[:, :, 7:], torch.zeros(32, 4, 2))
            columns = torch.zeros(32, 20)
            cpu_gemm.matmul_into(a[0], b[0], columns[:, 5:12])
            torch.testing.assert_close(columns[:, 5:12], a[0] @ b[0])
            assert columns[:, :5].abs().sum() == 0 and columns[:, 12:].abs().sum() == 0


def test_cpu_gemm_library_is_fixed_per_machine_and_forced_by_name(monkeypatch):
    from mtlkit import ConfigError
    from mtlkit.models import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "_onednn_available", lambda: True)
    zen4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    zen3 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu sse avx2 fma\n"
    xeon = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    # oneDNN only where it was measured faster: AMD CPUs with AVX-512 (Zen 4, Zen 5), not Zen 3 or Xeons
    for cpuinfo, expected in ((zen4, "onednn"), (zen3, "mkl"), (xeon, "mkl"), ("", "mkl")):
        monkeypatch.setattr(cpu_gemm, "_cpuinfo", lambda cpuinfo=cpuinfo: cpuinfo)
        monkeypatch.delenv("MTLKIT_CPU_GEMM", raising=False)
        assert cpu_gemm.cpu_gemm_library() == expected
        monkeypatch.setenv("MTLKIT_CPU_GEMM", "mkl")
        assert cpu_gemm.cpu_gemm_library() == "mkl"
        with cpu_gemm.forced_cpu_gemm_library("onednn"):
            assert cpu_gemm.cpu_gemm_library() == "onednn"
    monkeypatch.setattr(cpu_gemm, "_onednn_available", lambda: False)
    with cpu_gemm.forced_cpu_gemm_library("onednn"):
        assert cpu_gemm.cpu_gemm_library() == "mkl"  # a torch without oneDNN keeps MKL
    monkeypatch.setenv("MTLKIT_CPU_GEMM", "blas")
    with pytest.raises(ConfigError, match=r"MTLKIT_CPU_GEMM: expected one of \['auto', 'mkl', 'onednn'\], got 'blas'"):
        cpu_gemm.cpu_gemm_library()


def test_onednn_gets_plain_large_float32_matrices_only():
    from mtlkit.models import cpu_gemm

    big, wide = torch.randn(1024, 272), torch.randn(272, 2056)
    with cpu_gemm.forced_cpu_gemm_library("onednn"):
        assert cpu_gemm.uses_onednn(big, wide) == cpu_gemm._onednn_available()
        assert not cpu_gemm.uses_onednn(big, torch.randn(272, 4112)[:, :2056])  # a second operand out of wider rows
        rows = torch.randn(1024, 544)[:, :272]
        assert cpu_gemm.uses_onednn(rows, wide) == cpu_gemm._onednn_available()  # a first one is fine
        assert not cpu_gemm.uses_onednn(torch.randn(2056, 544)[:, :272].t(), big.t())  # transposed out of wider rows
        assert cpu_gemm.uses_onednn_batched(rows.expand(8, -1, -1), torch.randn(272, 512).expand(8, -1, -1)) == cpu_gemm._onednn_available()
        assert not cpu_gemm.uses_onednn_batched(rows[:2].expand(100, -1, -1), wide.expand(100, -1, -1))  # too many entries
        assert not cpu_gemm.uses_onednn_batched(rows[:8].expand(8, -1, -1), wide.expand(8, -1, -1))  # too little work each
        assert not cpu_gemm.uses_onednn(big[:8], wide[:, :8].contiguous())  # too little work
        assert not cpu_gemm.uses_onednn(big.double(), wide.double())
    with cpu_gemm.forced_cpu_gemm_library("mkl"):
        assert not cpu_gemm.uses_onednn(big, wide)
        torch.testing.assert_close(cpu_gemm.matmul(big, wide), big @ wide)


def test_a_traced_graph_keeps_atens_gemm():
    """Under torch.export (and compile) the stack's GEMMs stay aten's, whatever the library: no guard on
    the dynamic batch size, and the exported program serves where oneDNN is absent."""
    from mtlkit.models import cpu_gemm

    torch.manual_seed(0)
    stack = StackedMLP(8, 271, (64,), shared_input=True, activate_last=True).eval()
    stack.FUSED_MIN_ACTIVATIONS = 0
    x = torch.randn(512, 271)
    with cpu_gemm.forced_cpu_gemm_library("onednn"), torch.no_grad():
        program = torch.export.export(stack, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
        expected = stack(x)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in target for target in targets) and any("mm" in target for target in targets)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
