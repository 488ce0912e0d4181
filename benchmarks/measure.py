"""One measurement in a fresh process (so peak RSS is this library's alone). Prints one JSON line.

    python -m benchmarks.measure '{"library": "mtlkit", "workload": "W1", "model": "mmoe", ...}'
"""

from __future__ import annotations

import json
import resource
import sys
import traceback


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux's ``ru_maxrss`` is inherited from the parent at ``fork`` and kept across ``exec``, so a
    child of a large runner would report the runner's peak; ``VmHWM`` belongs to the process's own
    address space, which ``exec`` replaces.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(spec.get("threads", 2))
    from benchmarks.libraries import MEASURE
    from benchmarks.workloads import WORKLOADS, make_data

    workload = WORKLOADS[spec["workload"]]
    if spec.get("batch_size"):
        import dataclasses

        workload = dataclasses.replace(workload, batch_size=spec["batch_size"])
    # Every library gets the same rows: one window of steps is one pass over them (the references'
    # trainers are timed one epoch per window), so data memory is equal in the RSS comparison.
    rows = spec.get("rows") or workload.batch_size * spec["steps"]
    data = make_data(workload, rows)
    result = {"library": spec["library"], "workload": spec["workload"], "model": spec["model"]}
    try:
        kwargs = {"compile_model": True} if spec.get("compile") else {}
        device = spec.get("device", "cpu")
        result.update(MEASURE[spec["library"]](workload, spec["model"], data, spec["windows"], spec["steps"],
                                               spec["warmup"], device=device, **kwargs))
        if torch.device(device).type == "cuda":
            result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except NotImplementedError as error:
        result["error"] = f"not available: {error}"
    except Exception as error:  # a reference library crashing is a result, not a benchmark failure
        result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        result["traceback"] = traceback.format_exc()[-2000:]
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
