"""How much of W1 MMoE's model step is the library's own Python, and how much its layout.

Times, in one process and alternating, five versions of one training step (forward, losses, their
sum, backward) on the same batch and the same parameters:

- ``module path``: the model through its modules (``small_mixture = False``), ``task_losses`` and
  ``FixedWeighting``;
- ``same ops, one function``: the aten ops that step runs, written out in one function (no module
  calls, no per-task dicts): its loss and gradients must equal the module path's exactly;
- ``batch-last, one function``: the same model with every activation stored features x batch (experts
  ``(E, D, B)``, mixing by a broadcast multiply and a sum, towers ``(K, width, B)``): the same math
  in another summation order, checked to 1e-5;
- ``batch-last, weights stored so``: the same on copies of the parameters stored in the orientation
  that layout reads (``W^T``, biases as columns), so no gradient needs a transpose or a copy;
- ``mtlkit``: the model as the trainer runs it, through ``models/small_mixture.py`` (the batch-last
  maths as one autograd node with a written-out backward), checked to 1e-5.

The first gap is the library's glue (module calls, checks, dict building); the others what a
batch-last layout of the whole small model would cost or save. None of the functions is a training path:

    python -m benchmarks.step_glue --steps 300 --rounds 5
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.alternating import add_alternation_arguments, print_timings, time_alternating
from benchmarks.libraries import build_mtlkit
from benchmarks.workloads import WORKLOADS, make_data

VARIANTS = ("module path", "same ops, one function", "batch-last, one function", "batch-last, weights stored so", "mtlkit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_alternation_arguments(parser, steps=300)
    args = parser.parse_args()
    from mtlkit.files import write_json
    from mtlkit.models.gates import mix_experts
    from mtlkit.objectives import FixedWeighting, task_losses

    workload = WORKLOADS["W1"]
    size = workload.batch_size
    model, tasks, dataset = build_mtlkit(workload, "mmoe", make_data(workload, size))
    batch = dataset.subset(slice(0, size))
    x, labels = batch.inputs, batch.labels
    weighting = FixedWeighting(tasks)
    params = list(model.parameters())
    expert, gate = model.experts.linears[0], model.gates.linear
    hidden, head = model.towers.net.linears
    num_experts, width, num_gates = expert.num_stacks, expert.out_features, gate.num_stacks
    labels_by_task = labels.t().contiguous()

    def through_modules(small_mixture: bool = False) -> torch.Tensor:
        model.small_mixture = small_mixture
        losses = task_losses(model(x), labels, batch.label_mask, tasks, all_labelled=True)
        return weighting(losses)[0]

    def same_ops() -> torch.Tensor:
        experts = torch.relu(torch.addmm(expert.bias.view(1, -1), x, expert.weight)).view(size, num_experts, width)
        logits = torch.addmm(gate.bias.view(-1, 1), gate.weight.t(), x.t()).view(num_gates, num_experts, size)
        mixed = mix_experts(torch.softmax(logits, dim=1).permute(2, 0, 1), experts).transpose(0, 1)
        h = torch.relu(torch.baddbmm(hidden.bias.unsqueeze(1), mixed, hidden.weight))
        out = torch.baddbmm(head.bias.unsqueeze(1), h, head.weight)
        return F.mse_loss(out[..., 0], labels_by_task, reduction="none").mean(dim=1).sum()

    def batch_last_oriented() -> list[torch.Tensor]:
        """The model's parameters (views) in the orientation a batch-last step reads, in ``params``'s order."""
        return [expert.weight.t(), expert.bias.view(-1, 1), gate.weight.t(), gate.bias.view(-1, 1),
                hidden.weight.transpose(1, 2), hidden.bias.unsqueeze(2), head.weight.transpose(1, 2), head.bias.unsqueeze(2)]

    def batch_last_step(expert_w, expert_b, gate_w, gate_b, hidden_w, hidden_b, head_w, head_b) -> torch.Tensor:
        xt = x.t()
        experts = torch.relu(torch.addmm(expert_b, expert_w, xt)).view(num_experts, width, size)
        gates = torch.softmax(torch.addmm(gate_b, gate_w, xt).view(num_gates, num_experts, size), dim=1)
        mixed = (gates[:, :, None, :] * experts[None]).sum(dim=1)  # (G, D, B)
        out = torch.baddbmm(head_b, head_w, torch.relu(torch.baddbmm(hidden_b, hidden_w, mixed)))
        return F.mse_loss(out[:, 0], labels_by_task, reduction="none").mean(dim=1).sum()

    # Copies stored batch-last, and how to turn their gradients back into the model's shapes.
    stored = [t.detach().clone().contiguous().requires_grad_() for t in batch_last_oriented()]
    back = [lambda g: g.t(), lambda g: g.view(num_experts, width), lambda g: g.t(), lambda g: g.view(num_gates, -1),
            lambda g: g.transpose(1, 2), lambda g: g[..., 0], lambda g: g.transpose(1, 2), lambda g: g[..., 0]]

    def batch_last() -> torch.Tensor:
        return batch_last_step(*batch_last_oriented())

    def batch_last_stored() -> torch.Tensor:
        return batch_last_step(*stored)

    steps_by_name = dict(zip(VARIANTS, (through_modules, same_ops, batch_last, batch_last_stored, lambda: through_modules(True))))
    weights = {name: params for name in VARIANTS}
    weights["batch-last, weights stored so"] = stored

    def loss_and_grads(name):
        for p in weights[name]:
            p.grad = None
        loss = steps_by_name[name]()
        loss.backward()
        grads = [p.grad.clone() for p in weights[name]]
        if weights[name] is stored:
            grads = [to_model(g) for to_model, g in zip(back, grads)]
        return loss.detach(), grads

    reference = loss_and_grads("module path")
    for name in VARIANTS:
        loss, grads = loss_and_grads(name)
        if "batch-last" in name or name == "mtlkit":  # another summation order
            same = torch.allclose(loss, reference[0], rtol=1e-5) and \
                all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, reference[1]))
        else:
            same = torch.equal(loss, reference[0]) and all(torch.equal(a, b) for a, b in zip(grads, reference[1]))
        if not same:
            raise SystemExit(f"{name}: loss or gradients differ from the module path's step")

    def timed(name: str, steps: int) -> float:
        fn, leaves = steps_by_name[name], weights[name]
        start = time.perf_counter()
        for _ in range(steps):
            for p in leaves:
                p.grad = None
            fn().backward()
        return (time.perf_counter() - start) / steps

    seconds = time_alternating(timed, VARIANTS, args.rounds, args.steps)
    print(f"W1 mmoe: forward, losses, backward on one batch of {size} rows; {args.rounds} x {args.steps} steps each, alternating")
    print_timings(seconds, "module path", "vs module path")
    if args.out is not None:
        write_json(args.out, seconds)


if __name__ == "__main__":
    main()
