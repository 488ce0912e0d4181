"""Run under torchrun by test_distributed.py: two processes (on the CPU, or sharing a GPU) train one model with DDP."""

import sys

import torch

from mtlkit.data import make_synthetic
from mtlkit.models import build_model
from mtlkit.training import Trainer, TrainerConfig, evaluate
from mtlkit.training.distributed import init_distributed

assert init_distributed()
rank = torch.distributed.get_rank()
data = make_synthetic(correlation=0.5, num_rows=4000, input_dim=20, num_sine_terms=0, seed=0)
train, valid = data.to_tensors().split([0.8, 0.2], seed=0)
torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
model = build_model("mmoe", input_dim=20, tasks=data.tasks, num_experts=4)
before = evaluate(model, valid, model.tasks)["y1"]["loss"]
weighting = sys.argv[2] if len(sys.argv) > 2 else "fixed"
trainer = Trainer(model, TrainerConfig(max_epochs=5, batch_size=64, patience=None, weighting=weighting))
result = trainer.fit(train, valid, state_file=f"{sys.argv[1]}/state.pt")  # rank 0 saves after each epoch
after = evaluate(model, valid, model.tasks)["y1"]["loss"]
torch.save({"state": model.state_dict(), "steps": result.steps, "before": before, "after": after,
            "weights": trainer.weighting.current_weights()},
           f"{sys.argv[1]}/rank{rank}.pt")
torch.distributed.destroy_process_group()
