"""Run under torchrun by test_distributed.py: two processes (on the CPU, or sharing a GPU) train one model with DDP."""

import sys

import torch

from mtlkit.data import MultiTaskTensors, make_funnel, make_synthetic
from mtlkit.models import build_model, esmm_tasks
from mtlkit.training import Trainer, TrainerConfig, evaluate
from mtlkit.training.distributed import init_distributed

assert init_distributed()
rank = torch.distributed.get_rank()
weighting = sys.argv[2] if len(sys.argv) > 2 else "fixed"
model_name = sys.argv[3] if len(sys.argv) > 3 else "mmoe"
precision = sys.argv[4] if len(sys.argv) > 4 else "fp32"
surgery, _, scope = (sys.argv[5] if len(sys.argv) > 5 else "none").partition(":")  # "moco:shared_fixed"
surgery_options = {} if surgery == "none" else {"gradient_surgery": surgery, "gradient_surgery_scope": scope or "all"}
if model_name in ("aitm", "escm2_dr"):  # a funnel of binary steps, so that the model's auxiliary loss takes part
    data = make_funnel(["click", "buy"], [0.4, 0.5], num_rows=4000, input_dim=20, seed=0)
    options = {"bottom_hidden": [16, 8], "calibration_weight": 1.0}
else:
    data = make_synthetic(correlation=0.5, num_rows=4000, input_dim=20, num_sine_terms=0, seed=0)
    options = {"num_experts": 4}
if model_name == "ple_dselect":  # DSelect-k gates: their penalty (codes of no expert, entropy) as the auxiliary loss
    model_name, options = "ple", {"num_shared_experts": 2, "num_task_experts": 1, "gate_type": "dselect_k", "gate_top_k": 2,
                                  "gate_entropy_weight": 0.01}
if model_name == "stem":  # each task's loss stops at the other tasks' experts
    options = {"num_shared_experts": 2, "num_task_experts": 1, "num_levels": 2}
tasks, tensors = data.tasks, data.to_tensors()
if model_name == "escm2_dr":  # ESCM2-DR: an imputation network that only its auxiliary loss trains
    click, buy = tensors.labels[:, 0], tensors.labels[:, 1]
    tasks, model_name, options = esmm_tasks(), "escm2", {"tower_hidden": [16, 8], "counterfactual_mode": "dr"}
    tensors = MultiTaskTensors(tensors.inputs, torch.stack([click, torch.where(click > 0, buy, torch.nan), buy], 1),
                               [t.name for t in tasks])
first = tasks[0].name
train, valid = tensors.split([0.8, 0.2], seed=0)
torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
model = build_model(model_name, input_dim=20, tasks=tasks, **options)
before = evaluate(model, valid, model.tasks)[first]["loss"]
trainer = Trainer(model, TrainerConfig(max_epochs=5, batch_size=64, patience=None, weighting=weighting, precision=precision,
                                       **surgery_options))
result = trainer.fit(train, valid, state_file=f"{sys.argv[1]}/state.pt")  # rank 0 saves after each epoch
after = evaluate(model, valid, model.tasks)[first]["loss"]
torch.save({"state": model.state_dict(), "steps": result.steps, "before": before, "after": after,
            "weights": trainer.weighting.current_weights(), "weighting": trainer.weighting.state_dict(),
            "surgery": trainer._surgery.state_dict() if hasattr(trainer._surgery, "state_dict") else None},
           f"{sys.argv[1]}/rank{rank}.pt")
torch.distributed.destroy_process_group()
