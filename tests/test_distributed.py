import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlkit import ConfigError
from mtlkit.objectives.replicas import assign_gradient, mean_gradients_over_replicas
from mtlkit.training import distributed


@pytest.mark.parametrize("weighting, port, model, precision, surgery", [
    ("fixed", 29533, "mmoe", "fp32", "none"), ("dwa", 29534, "mmoe", "fp32", "none"), ("gradnorm", 29535, "mmoe", "fp32", "none"),
    ("fixed", 29536, "aitm", "bf16", "none"),  # a model's auxiliary loss and autocast under DDP
    ("fixed", 29537, "ple_dselect", "fp32", "none"),  # the gates' penalty under DDP
    ("famo", 29538, "mmoe", "fp32", "none"),  # FAMO's logits, updated from each rank's own losses
    ("fixed", 29539, "stem", "fp32", "none"),  # gradients stopped at other tasks' experts: every parameter still gets one
    ("fixed", 29540, "escm2_dr", "fp32", "none"),  # an imputation network that only the model's auxiliary loss trains
    ("uncertainty", 29541, "mmoe", "fp32", "none"),  # learned weights outside DDP's module: their gradients averaged too
    ("uncertainty", 29542, "mmoe", "fp32", "pcgrad"),  # a surgery of the tasks' gradients averaged over the ranks
    ("fixed", 29543, "mmoe", "fp32", "db_mtl:shared_fixed"),  # with state per coordinate, on the first step's shared set
])
def test_torchrun_ddp_with_two_ranks(tmp_path, weighting, port, model, precision, surgery):
    # On the CPU through Gloo; on a one-GPU machine both ranks share the GPU, through Gloo too.
    # The adaptive weightings read each rank's own losses; they must still agree across ranks.
    script = Path(__file__).with_name("distributed_job.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           str(script), str(tmp_path), weighting, model, precision, surgery],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Each rank trains on half of every epoch: 3200 rows / 2 ranks / 64 = 25 steps per epoch.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 5 * 25
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], value)  # DDP kept the replicas identical
    # Regression losses fall by more than half; the funnel's first step is a noisy binary task.
    assert ranks[0]["after"] < (0.98 if model in ("aitm", "escm2_dr") else 0.5) * ranks[0]["before"]  # aitm: 0.681 -> 0.651
    if weighting == "famo":  # its logged weights are each rank's own batch's; its logits are shared
        assert ranks[0]["weighting"]["logits"].abs().max() > 0
        torch.testing.assert_close(ranks[0]["weighting"]["logits"], ranks[1]["weighting"]["logits"], rtol=0, atol=0)
    else:
        assert ranks[0]["weights"] == ranks[1]["weights"]
    if weighting == "gradnorm":  # the first step's losses, its reference, averaged over the ranks
        torch.testing.assert_close(ranks[0]["weighting"]["initial_losses"], ranks[1]["weighting"]["initial_losses"], rtol=0, atol=0)
    if surgery.startswith("db_mtl"):  # the same averages on every rank, over the experts' coordinates alone
        averages = ranks[0]["surgery"]["averages"]
        torch.testing.assert_close(ranks[1]["surgery"]["averages"], averages, rtol=0, atol=0)
        assert 0 < averages.shape[1] < sum(v.numel() for v in ranks[0]["state"].values())
    assert torch.load(tmp_path / "state.pt", weights_only=True)["loop"]["epoch"] == 4  # saved after epochs 1-4 of 5
    assert (set(ranks[0]["weights"].values()) - {0.0} == {1.0}) == (weighting == "fixed")  # esmm_tasks: cvr weight 0


@pytest.mark.parametrize("gpus, local_processes, expected", [(0, 2, "gloo"), (1, 2, "gloo"), (2, 2, "nccl"), (4, 2, "nccl")])
def test_nccl_only_where_every_local_process_has_a_gpu(monkeypatch, gpus, local_processes, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert distributed._default_backend() == expected


def test_a_bad_backend_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MTLKIT_DISTRIBUTED_BACKEND", "mpi")
    with pytest.raises(ConfigError, match="MTLKIT_DISTRIBUTED_BACKEND.*'mpi'"):
        distributed.init_distributed()


_GRADIENTS_JOB = """
import sys, torch, torch.distributed as dist
from mtlkit.objectives.replicas import mean_gradients_over_replicas
dist.init_process_group("gloo")
rank = dist.get_rank()
both, only_rank0, neither, scalar = (torch.zeros(3), torch.zeros(2, 2), torch.zeros(4), torch.zeros(()))
both.grad = torch.full((3,), 1.0 + rank)  # 1 and 2: mean 1.5
if rank == 0:
    only_rank0.grad = torch.tensor([[4.0, 8.0], [-2.0, 6.0]])  # rank 1 counts zeros: mean is half
scalar.grad = torch.tensor(3.0 * rank)
mean_gradients_over_replicas([both, only_rank0, neither, scalar])
torch.save({"both": both.grad, "only_rank0": only_rank0.grad, "neither": neither.grad, "scalar": scalar.grad},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_gradients_averaged_over_replicas_that_lack_some(tmp_path):
    # A learned weight that only one replica's batch reached: before, each replica concatenated only the
    # gradients it had, and the all-reduce of two different sizes failed or hung.
    script = tmp_path / "job.py"
    script.write_text(_GRADIENTS_JOB)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(grads["both"], torch.full((3,), 1.5))
        torch.testing.assert_close(grads["only_rank0"], torch.tensor([[2.0, 4.0], [-1.0, 3.0]]))
        assert grads["neither"] is None
        torch.testing.assert_close(grads["scalar"], torch.tensor(1.5))


def test_gradients_outside_a_distributed_job_are_left_alone():
    weight = torch.zeros(2)
    weight.grad = torch.tensor([1.0, -2.0])
    mean_gradients_over_replicas([weight, torch.zeros(1)])
    torch.testing.assert_close(weight.grad, torch.tensor([1.0, -2.0]))


def test_an_assigned_gradient_is_written_into_the_existing_buffer():
    # Small models' gradients are views of the optimizer's flat buffer: a new tensor would leave the
    # buffer (what the fused Adam reads) behind.
    flat = torch.zeros(5)
    weight = torch.zeros(2, requires_grad=True)
    weight.grad = flat[1:3]
    assign_gradient(weight, torch.tensor([1.0, -2.0]))
    assert weight.grad.data_ptr() == flat[1:3].data_ptr()
    torch.testing.assert_close(flat, torch.tensor([0.0, 1.0, -2.0, 0.0, 0.0]))
    bias = torch.zeros(2, requires_grad=True)
    source = torch.tensor([3.0, 4.0])
    assign_gradient(bias, source)
    source.zero_()  # without a gradient of its own, the parameter gets a copy, not the caller's tensor
    torch.testing.assert_close(bias.grad, torch.tensor([3.0, 4.0]))
