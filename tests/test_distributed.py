import subprocess
import sys
from pathlib import Path

import torch


def test_torchrun_ddp_on_cpu(tmp_path):
    script = Path(__file__).with_name("distributed_job.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Each rank trains on half of every epoch: 3200 rows / 2 ranks / 64 = 25 steps per epoch.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 5 * 25
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], value)  # DDP kept the replicas identical
    assert ranks[0]["after"] < 0.5 * ranks[0]["before"]
