"""The trainer keeps the memory a step frees for the next step (glibc's malloc thresholds)."""

import json
import platform
import subprocess
import sys

import pytest

from mtlkit.training import TrainerConfig

# A "step" whose temporaries (4 x 2 MiB) are freed at its end: glibc's dynamic thresholds hand the
# top of the heap back to the kernel after each step and the next step page-faults it in again.
_STEPS = """
import json, resource, sys, torch
from mtlkit.training.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    temporaries = [torch.empty(1 << 19).fill_(1.0) for _ in range(4)]
    del temporaries
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults_per_step(mode: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_for_the_next_step():
    import os

    kept = _faults_per_step("keep")
    assert kept["kept"] is True
    # 8 MiB is 2,048 pages, faulted in the first steps only.
    assert max(kept["faults"][4:]) < 100
    # A user's environment that maps every block afresh (it wins over the trainer's thresholds):
    # the count above does see pages handed back and faulted in again.
    mapped = _faults_per_step("keep", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert mapped["kept"] is False
    assert min(mapped["faults"][4:]) > 1000


def test_keep_freed_memory_is_a_checked_switch():
    assert TrainerConfig().keep_freed_memory is True
    with pytest.raises(Exception, match="keep_freed_memory"):
        TrainerConfig(keep_freed_memory="yes")
