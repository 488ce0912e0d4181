"""One library's measuring session in a process of its own (so peak RSS is that library's alone).

    python -m benchmarks.measure '{"library": "mtlkit", "workload": "W1", "model": "mmoe", ...}'

The process builds the library's model, data and trainer and warms them up, answers ``ready``, then
times one window for each line it reads on stdin (``trainer``, ``model_alone`` or ``inference``)
and answers its samples/s; on ``done`` it answers its peak memory and exits. ``benchmarks.run``
keeps one such process per library and asks them for windows in turn. Every answer is one line of
JSON after :data:`REPLY` (the libraries print lines of their own).
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


REPLY = "@@measure "


def _reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


def _error(error: Exception) -> dict:
    """A library crashing is a result, not a benchmark failure: its first line (the traceback goes
    to stderr)."""
    if isinstance(error, NotImplementedError):
        return {"error": f"not available: {error}"}
    traceback.print_exc()
    return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(spec.get("threads", 2))
    from benchmarks.libraries import KINDS, SESSIONS
    from benchmarks.workloads import WORKLOADS, make_data

    workload = WORKLOADS[spec["workload"]]
    if spec.get("batch_size"):
        import dataclasses

        workload = dataclasses.replace(workload, batch_size=spec["batch_size"])
    # Every library gets the same rows: one window of steps is one pass over them (the references'
    # trainers are timed one epoch per window), so data memory is equal in the RSS comparison.
    rows = spec.get("rows") or workload.batch_size * spec["steps"]
    data = make_data(workload, rows)
    device = spec.get("device", "cpu")
    try:
        kwargs = {"compile_model": True} if spec.get("compile") else {}
        session = SESSIONS[spec["library"]](workload, spec["model"], data, spec["steps"], spec["warmup"], device=device, **kwargs)
        _reply({"ready": True})
    except Exception as error:
        session = None
        _reply(_error(error))
    while session is not None:
        kind = sys.stdin.readline().strip()
        if kind in ("done", ""):  # "": the runner is gone
            break
        if kind not in KINDS:
            _reply({"error": f"unknown window kind {kind!r}: expected one of {list(KINDS)}"})
            continue
        try:
            _reply({"rate": session[kind]()})
        except Exception as error:
            _reply(_error(error))
    usage = {"peak_rss_mb": peak_rss_mb()}
    if torch.device(device).type == "cuda":
        usage["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    _reply(usage)


if __name__ == "__main__":
    main()
