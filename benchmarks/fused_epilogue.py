"""Whether fused kernels could pay on this CPU, with those torch offers: GEMMs with the ReLU in their
epilogue, and one generated loop for the memory-bound passes around the experts' mixing.

W2's training step stays under 80 % of its GEMM-only bound because of the memory-bound passes beside
its GEMMs: the ReLUs, the backward's masks, the adds (docs/performance.md). Only a GEMM that applies
the ReLU while its output tile is still in cache would remove such a pass. This times, at W2 MMoE's
two expert layers and at the backward's input gradient into the first (masked by its ReLU), in one
process and alternating, every way torch can run a GEMM then a ReLU or a mask on a CPU:

* MKL's GEMM alone: what the GEMM-only bound counts;
* MKL's GEMM, then the bias and ReLU (or the mask) as one separate in-place pass: what mtlkit runs;
* oneDNN's linear with a ReLU post-op (``torch.ops.mkldnn._linear_pointwise``) on a weight packed
  beforehand (training would have to pack it again every step). First layer only: it has no
  batched form;
* inductor's C++ GEMM template with the ReLU or the mask in its epilogue (``max_autotune``, its CPP
  backend alone). In torch 2.13 it takes ``bmm`` with weights that change (training), and ``mm``
  only with frozen weights, that is at inference.

Two more cases need no GEMM template: the memory-bound passes around the mixing of the experts'
outputs, which inductor's plain elementwise code can fuse into one loop. In the backward, mtlkit runs
the mixing's gradient as a ``bmm`` into a batch-major ``[B, S, D]`` buffer, then moves it into the
experts' stack-major ``[S, B, D]`` layout with their ReLU mask applied; one generated loop writes the
masked stack-major gradient directly. At inference, mtlkit adds the second layer's bias in the ReLU's
pass over the experts' ``[S, B, D]`` output, then mixes with a ``bmm``; one generated loop reads that
output once and writes only the ``[B, G, D]`` mixtures.

A fused kernel can gain at most the separate pass's time (GEMM and pass, less the GEMM alone); it pays
only if it runs its GEMM about as fast as MKL. Each variant's output is checked against the plain
one before it is timed.

    python -m benchmarks.fused_epilogue [--rows 2048] [--out F.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.alternating import print_timings, time_alternating
from benchmarks.workloads import WORKLOADS


def _could_not_build(error: Exception) -> str:
    """Why a variant is left out: the first line of inductor's error."""
    return f"inductor could not build it: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


def _inductor_template(fn: Callable[..., torch.Tensor], *args: torch.Tensor, freeze: bool = False):
    """``fn`` compiled with inductor's C++ GEMM template as the only GEMM choice, its parameters
    frozen into constants where ``freeze``; ``(None, reason)`` where inductor cannot build it (no C++
    compiler) or the generated code does not use the template. Called under ``no_grad``, as compiled."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP", "freezing": freeze}
    try:
        with inductor_config.patch(options), torch.no_grad():
            compiled = torch.compile(fn, dynamic=False)
            _, sources = run_and_get_code(compiled, *args)
    except Exception as error:  # inductor raises many kinds of errors when it cannot build a kernel
        return None, _could_not_build(error)
    # The template's kernels are built on a generated "micro_gemm"; the ReLU then shows in the kernel's
    # name (W2's second layer: one cpp_fused_bmm_relu kernel).
    if not any("micro_gemm" in source for source in sources):
        return None, "inductor chose no C++ GEMM template for this GEMM"
    return compiled, None


def _inductor_elementwise(fn: Callable[..., torch.Tensor], *args: torch.Tensor):
    """``fn`` compiled by inductor with its default choices (the elementwise loops it generates);
    ``(None, reason)`` where it cannot build it."""
    try:
        compiled = torch.compile(fn, dynamic=False)
        with torch.no_grad():
            compiled(*args)
    except Exception as error:  # as in _inductor_template
        return None, _could_not_build(error)
    return compiled, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=WORKLOADS["W2"].batch_size, help="batch rows (W2: 2,048)")
    parser.add_argument("--calls", type=int, default=20, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the timings as JSON here")
    args = parser.parse_args()
    from mtlkit.files import write_json
    from mtlkit.models.fused_mlp import _add_relu_, _relu_grad_
    from mtlkit.training.memory import keep_freed_memory

    keep_freed_memory()  # as the trainer does: otherwise each fresh output page-faults inside its GEMM
    workload = WORKLOADS["W2"]
    experts, (hidden, width) = workload.num_experts, workload.expert_hidden[:2]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, workload.input_dim, generator=generator)
    weight = torch.randn(workload.input_dim, experts * hidden, generator=generator) / workload.input_dim ** 0.5
    bias = torch.randn(experts * hidden, generator=generator)
    # The second layer as the trainer runs it: each expert's input with its constant-1 column.
    h = torch.relu(torch.randn(experts, args.rows, hidden + 1, generator=generator))
    weight2 = torch.randn(experts, hidden + 1, width, generator=generator) / hidden ** 0.5
    # The backward's input gradient into the first layer, masked by that layer's ReLU.
    grad2 = torch.randn(experts, args.rows, width, generator=generator)
    weight2_t = weight2[:, :hidden].transpose(1, 2).contiguous()
    h_rows = h[:, :, :hidden].contiguous()

    class FirstLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.relu(inputs @ self.weight + self.bias)

    def second_layer(inputs: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.bmm(inputs, matrices))

    def masked_gradient(grad: torch.Tensor, matrices: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        return torch.where(activated > 0, torch.bmm(grad, matrices), 0.0)

    # The mixing of the experts' outputs ([S, B, D], after the ReLU) by G gates ([B, G, S]).
    gates = 2  # one per task: W2's click and conversion
    gate_weights = torch.softmax(torch.randn(args.rows, gates, experts, generator=generator), dim=-1)
    mixed_grad = torch.randn(args.rows, gates, width, generator=generator)
    expert_out = torch.relu(torch.randn(experts, args.rows, width, generator=generator))
    expert_bias = torch.randn(experts, 1, width, generator=generator)

    def mixing_backward_unfused() -> torch.Tensor:
        batch_major = torch.bmm(gate_weights.transpose(1, 2), mixed_grad)  # as _MixExperts' backward
        moved = torch.empty(experts, args.rows, width)  # as _StackedReluMLP's backward
        return torch.ops.aten.threshold_backward.grad_input(batch_major.transpose(0, 1), expert_out, 0, grad_input=moved)

    def mixing_backward(weights: torch.Tensor, grad: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        per_expert = weights.permute(2, 0, 1).unsqueeze(-1)  # [S, B, G, 1]
        return torch.where(activated > 0, (per_expert * grad.unsqueeze(0)).sum(2), 0.0)

    def inference_mixing(weights: torch.Tensor, pre_activation: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(pre_activation + bias).transpose(0, 1)  # [B, S, D]
        return (weights.unsqueeze(-1) * activated.unsqueeze(1)).sum(2)

    # oneDNN's linear needs its weight packed for it (again after every optimizer step, in training).
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), args.rows) if torch.backends.mkldnn.is_available() else None
    first_template, first_why = _inductor_template(FirstLayer().eval(), x, freeze=True)
    second_template, second_why = _inductor_template(second_layer, h, weight2)
    mask_template, mask_why = _inductor_template(masked_gradient, grad2, weight2_t, h_rows)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "first layer: MKL mm alone": lambda: torch.mm(x, weight),
        "first layer: MKL mm, then bias + ReLU pass": lambda: _add_relu_(torch.mm(x, weight), bias),
        "second layer: MKL bmm alone": lambda: torch.bmm(h, weight2),
        "second layer: MKL bmm, then ReLU pass": lambda: torch.bmm(h, weight2).relu_(),
        "gradient: MKL bmm alone": lambda: torch.bmm(grad2, weight2_t),
        "gradient: MKL bmm, then mask pass": lambda: _relu_grad_(torch.bmm(grad2, weight2_t), h_rows),
    }
    if packed is not None:
        variants["first layer: oneDNN linear, ReLU post-op"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "relu", [], "")
    else:
        print("first layer: oneDNN linear, ReLU post-op: not timed, this torch has no oneDNN")
    if first_template is not None:
        variants["first layer: inductor template, frozen"] = lambda: first_template(x)
    if second_template is not None:
        variants["second layer: inductor template"] = lambda: second_template(h, weight2)
    if mask_template is not None:
        variants["gradient: inductor template, mask in epilogue"] = lambda: mask_template(grad2, weight2_t, h_rows)
    mixing_backward_fused, mixing_backward_why = _inductor_elementwise(mixing_backward, gate_weights, mixed_grad, expert_out)
    inference_mixing_fused, inference_mixing_why = _inductor_elementwise(inference_mixing, gate_weights, expert_out, expert_bias)
    variants["mixing backward: MKL bmm, then masked move (mtlkit)"] = mixing_backward_unfused
    if mixing_backward_fused is not None:
        variants["mixing backward: inductor loop"] = lambda: mixing_backward_fused(gate_weights, mixed_grad, expert_out)
    variants["mixing inference: bias + ReLU pass, then MKL bmm (mtlkit)"] = lambda: torch.bmm(
        gate_weights, torch.ops.aten._add_relu(expert_out, expert_bias).transpose(0, 1))
    if inference_mixing_fused is not None:
        variants["mixing inference: inductor loop"] = lambda: inference_mixing_fused(gate_weights, expert_out, expert_bias)
    for name, why in (("mixing backward: inductor loop", mixing_backward_why), ("mixing inference: inductor loop", inference_mixing_why),
                      ("first layer: inductor template, frozen", first_why), ("second layer: inductor template", second_why),
                      ("gradient: inductor template, mask in epilogue", mask_why)):
        if why:
            print(f"{name}: not timed, {why}")

    with torch.no_grad():
        expected = {"first layer": torch.relu(x @ weight + bias), "second layer": torch.relu(torch.bmm(h, weight2)),
                    "gradient": masked_gradient(grad2, weight2_t, h_rows),
                    "mixing backward": mixing_backward(gate_weights, mixed_grad, expert_out),
                    "mixing inference": inference_mixing(gate_weights, expert_out, expert_bias)}
        for name, run in variants.items():
            if "alone" not in name and not torch.allclose(run(), expected[name.split(":")[0]], rtol=1e-4, atol=1e-4):
                raise SystemExit(f"{name}: its output differs from the unfused formulation (GEMM + ReLU, mask, or mixing)")

        def timed(name: str, calls: int) -> float:
            run = variants[name]
            start = time.perf_counter()
            for _ in range(calls):
                run()
            return (time.perf_counter() - start) / calls

        seconds = time_alternating(timed, list(variants), args.rounds, args.calls)
    print(f"W2 MMoE's expert layers, {args.rows} rows: {args.rounds} x {args.calls} calls each, alternating "
          f"(first layer [{args.rows} x {workload.input_dim}] @ [{workload.input_dim} x {experts * hidden}], "
          f"second {experts} x [{args.rows} x {hidden + 1}] @ [{hidden + 1} x {width}])")
    print(f"gradient: {experts} x [{args.rows} x {width}] @ [{width} x {hidden}], masked by the first layer's ReLU")
    for layer, base, label in (("first", "first layer: MKL mm alone", "vs alone"), ("second", "second layer: MKL bmm alone", "vs alone"),
                               ("gradient", "gradient: MKL bmm alone", "vs alone"),
                               ("mixing backward", "mixing backward: MKL bmm, then masked move (mtlkit)", "vs mtlkit"),
                               ("mixing inference", "mixing inference: bias + ReLU pass, then MKL bmm (mtlkit)", "vs mtlkit")):
        print_timings({name: values for name, values in seconds.items() if name.startswith(layer)}, base, label)
    if args.out is not None:
        write_json(args.out, seconds)


if __name__ == "__main__":
    main()
