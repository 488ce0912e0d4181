"""The benchmark suite: mtlkit against torch-rechub and deepctr-torch on workloads W1 and W2.

    python -m benchmarks.run                      # everything installed, default sizes
    python -m benchmarks.run --workloads W2 --models mmoe,ple --rounds 3
    python -m benchmarks.run --tiny               # seconds: checks the suite end to end
    python -m benchmarks.run --compile W1,W2      # mtlkit also with training.compile on both (default: W1)
    python -m benchmarks.run --device cuda        # every library on the GPU (no targets: issue 4's are the CPU's)

Each (library, workload, model) is measured in a process of its own (so its peak RSS is its own),
fresh for every round; within a round the libraries' processes, all set up and warmed up first, take
turns window by window (A B C, C B A, ...), so the machine's drift hits all of them alike. The same run
measures this machine's matmul peak and, for every model, its FLOPs per sample and the time of its
GEMMs alone, so results are also shown as a share of the roofline and of the GEMM-only bound. The
bound is timed twice: best of 3 x 20 runs of each GEMM before the rounds (the host's fastest moment),
and in windows of its own that take their turn beside the libraries' trainer and inference windows
(each GEMM run the window's steps times in a row); the trainer's share of it is the median, over the
turns, of the trainer's window over the bound's window of the same turn, so that on a drifting host the
bound and the trainer are measured alike.
Results print as tables and are written as JSON, with issue 4's targets judged on the run
(``benchmarks/targets.py``) for mtlkit's defaults and, where measured, for ``mtlkit (compiled)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.libraries import KINDS, LIBRARIES, build_mtlkit, import_error
from benchmarks.machine import (cpu_description, fastest_gemm_forms, gemm_bound_window, matmul_peak_gflops, matmul_peaks_gflops,
                                step_profile)
from benchmarks.measure import REPLY
from benchmarks.targets import (gemm_bound, gemm_bound_key, gemm_bound_share, judge, model_alone_share, paired_ratio,
                                print_verdicts, variant_shares)
from benchmarks.workloads import WORKLOADS, make_data

console = Console(width=200)
MTLKIT_VARIANTS = ("mtlkit", "mtlkit (compiled)")
# The GEMM-only bound's windows in a round's results (not a library).
GEMM_BOUND = "GEMM-only bound"
# Before each window, so the previous process's idle OpenMP threads have stopped spinning.
WINDOW_PAUSE_SECONDS = 0.02


class _MeasuringProcess:
    """One library's ``benchmarks.measure`` session for one round: set up and warmed up when made,
    then one timed window per :meth:`window` call, and its peak memory at :meth:`finish`."""

    def __init__(self, spec: dict) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill and block it
        self._process = subprocess.Popen([sys.executable, "-m", "benchmarks.measure", json.dumps(spec)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                         cwd=Path(__file__).resolve().parents[1])
        ready = self._answer()
        self.error: str | None = ready.get("error")
        self._usage: dict | None = None
        if self.error:
            # Ended now: a process tearing torch down takes a core for a second, which the next
            # library's windows would pay for.
            self.finish()

    def _answer(self) -> dict:
        for line in self._process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self._stderr.seek(0)
        last = self._stderr.read().strip().splitlines()[-1:]
        return {"error": f"process failed: {last}"}

    def window(self, kind: str) -> float | None:
        """Samples/s of one window of ``kind``; None (and :attr:`error` set) when the library failed."""
        if self.error:
            return None
        time.sleep(WINDOW_PAUSE_SECONDS)
        self._process.stdin.write(kind + "\n")
        self._process.stdin.flush()
        answer = self._answer()
        self.error = answer.get("error")
        return answer.get("rate")

    def finish(self) -> dict:
        """The process's peak memory (``peak_rss_mb``, and ``peak_gpu_memory_mb`` on a GPU), once it has ended."""
        if self._usage is None:
            try:
                self._process.stdin.write("done\n")
                self._process.stdin.flush()
            except BrokenPipeError:  # it ended on its own (its set-up failed)
                pass
            self._usage = self._answer()
            self._process.wait()
            self._stderr.close()
        return self._usage


def _measure_round(specs: dict[str, dict], windows: int,
                   bound: dict[str, Callable[[], float]] | None = None) -> dict[str, dict]:
    """One round: a process per library (``specs`` by name), set up one after the other, then
    ``windows`` windows of each kind from each, taking turns window by window, the order reversed on
    every other turn so a steady drift falls on all of them alike. A turn is one kind; the kinds follow
    each other turn by turn (trainer, model alone, inference, trainer, ...), so a library's trainer
    window and its model-alone window of the same index are a turn apart. ``bound`` (by kind: ``trainer``,
    ``inference``): timers of the GEMM-only bound's windows (``benchmarks.machine.gemm_bound_window``),
    run here, in this process, as one more participant of those kinds' turns. Returns per name the
    windows' rates by kind and the peak memory, or the error; under :data:`GEMM_BOUND` the bound's
    rates by kind."""
    bound = bound or {}
    processes = {name: _MeasuringProcess(spec) for name, spec in specs.items()}
    rates: dict[str, dict[str, list[float]]] = {name: {kind: [] for kind in KINDS} for name in specs}
    bound_rates: dict[str, list[float]] = {kind: [] for kind in bound}
    turn = 0
    for _ in range(windows):
        for kind in KINDS:
            participants = list(processes) + ([GEMM_BOUND] if kind in bound else [])
            for name in (participants if turn % 2 == 0 else participants[::-1]):
                if name == GEMM_BOUND:
                    time.sleep(WINDOW_PAUSE_SECONDS)
                    bound_rates[kind].append(bound[kind]())
                    continue
                rate = processes[name].window(kind)
                if rate is not None:
                    rates[name][kind].append(rate)
            turn += 1
    results = {}
    for name, process in processes.items():
        usage = process.finish()  # every process is ended, failed or not
        error = process.error or usage.get("error")
        results[name] = {"error": error} if error else {**rates[name], **usage}
    if bound:
        results[GEMM_BOUND] = bound_rates
    return results


def _roofline(workload_name: str, model_name: str, batch_size: int | None,
              gemm_bound: bool = True) -> tuple[dict, dict[str, list[Callable[[], object]]]]:
    """FLOPs per sample and (with ``gemm_bound``) the GEMM-only bound on this CPU of one mtlkit
    training step and of one inference batch, at the host's fastest moment; and (with ``gemm_bound``)
    the fastest form of each GEMM call, by kind (``trainer``, ``inference``), for the bound's windows."""
    import dataclasses

    from mtlkit.objectives import FixedWeighting, task_losses

    workload = WORKLOADS[workload_name]
    if batch_size:
        workload = dataclasses.replace(workload, batch_size=batch_size)
    data = make_data(workload, workload.batch_size)
    model, tasks, batch = build_mtlkit(workload, model_name, data)
    weighting = FixedWeighting(tasks)

    def step() -> None:
        total, _ = weighting(task_losses(model(batch.inputs), batch.labels, batch.label_mask, tasks))
        total.backward()

    flops, calls = step_profile(step)
    captured = {"flops_per_sample": flops / workload.batch_size, "gemm_calls_per_step": len(calls),
                "gemm_bound_samples_per_s": None, "inference_gemm_bound_samples_per_s": None}
    forms = {}
    if gemm_bound:
        captured["gemm_seconds_per_step"], forms["trainer"] = fastest_gemm_forms(calls)
        captured["gemm_bound_samples_per_s"] = workload.batch_size / captured["gemm_seconds_per_step"]

    # Inference has a roofline of its own (a third of the training FLOPs): where a reference
    # already runs near it, no implementation of the same maths can be much faster.
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(batch.inputs)

    flops, calls = step_profile(infer)
    captured["inference_flops_per_sample"] = flops / workload.batch_size
    if gemm_bound:
        seconds, forms["inference"] = fastest_gemm_forms(calls)
        captured["inference_gemm_bound_samples_per_s"] = workload.batch_size / seconds
    return captured, forms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--models", default=None, help="comma-separated (default: each workload's list)")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--rounds", type=int, default=2, help="rounds per (workload, model), each with fresh processes")
    parser.add_argument("--windows", type=int, default=5, help="timed windows of each kind per library and round")
    parser.add_argument("--window-seconds", type=float, default=1.0, help="target length of one window")
    parser.add_argument("--compile", default="W1", help="workloads on which mtlkit is also measured with training.compile "
                                                         "(torch.compile of its forward, losses and weighting; '' for none)")
    parser.add_argument("--tiny", action="store_true", help="tiny batches and windows: an end-to-end check, not a measurement")
    parser.add_argument("--device", default="cpu", help="where every library trains: 'cpu' (issue 4's targets are judged "
                                                        "there) or 'cuda' (throughputs, ratios and peak GPU memory)")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args(argv)

    libraries = [lib for lib in args.libraries.split(",") if lib]
    errors = {lib: import_error(lib) for lib in libraries}
    for lib, error in errors.items():
        if error:
            console.print(f"[yellow]cannot import {lib}, skipped:[/] {error} (pip install -r benchmarks/requirements.txt)")
    libraries = [lib for lib, error in errors.items() if not error]
    compiled_on = {w for w in args.compile.split(",") if w}

    on_cpu = torch.device(args.device).type == "cpu"
    # On the CPU the faster of torch's two GEMM libraries sets the peak (mtlkit.models.cpu_gemm).
    peaks = matmul_peaks_gflops() if on_cpu else {"cuda": matmul_peak_gflops(device=args.device)}
    peak = max(peaks.values())
    cpu = cpu_description()
    gpu = None if on_cpu else torch.cuda.get_device_name(args.device)
    by_library = f" ({', '.join(f'{name} {value:.1f}' for name, value in peaks.items())})" if len(peaks) > 1 else ""
    console.print(f"fp32 matmul peak ([2048x512]@[512x2048], {args.device}, {torch.get_num_threads()} CPU threads): "
                  f"{peak:.1f} GFLOP/s{by_library} on {cpu if on_cpu else f'{gpu} (host: {cpu})'}")
    report = {"machine": {"platform": platform.platform(), "cpu": cpu, "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "matmul_peak_gflops": peak, "matmul_peak_gflops_by_library": peaks,
                          "device": args.device}
              | ({} if on_cpu else {"gpu": gpu}),
              "settings": vars(args), "results": []}
    started = time.perf_counter()
    for workload_name in args.workloads.split(","):
        workload = WORKLOADS[workload_name]
        batch_size = 64 if args.tiny else None
        models = args.models.split(",") if args.models else list(workload.models)
        for model_name in [m for m in models if m in workload.models]:
            roof, bound_forms = _roofline(workload_name, model_name, batch_size, gemm_bound=on_cpu)
            roof["roofline_samples_per_s"] = peak * 1e9 / roof["flops_per_sample"]
            roof["inference_roofline_samples_per_s"] = peak * 1e9 / roof["inference_flops_per_sample"]
            # Window length from the GEMM bound: about window_seconds at a third of it. A GPU runs
            # these small steps at the pace of its kernel launches instead: 400 steps a second.
            rate = roof["gemm_bound_samples_per_s"] / 3 / workload.batch_size if on_cpu else 400
            steps = 2 if args.tiny else max(5, int(args.window_seconds * rate))
            entry = {"workload": workload_name, "model": model_name, **roof, "steps_per_window": steps,
                     "windows_per_round": 1 if args.tiny else args.windows, "libraries": {}, "kinds_take_turns": True,
                     "gemm_bound_windows": {kind: [] for kind in bound_forms}}
            bound = {kind: gemm_bound_window(forms, batch_size or workload.batch_size, steps)
                     for kind, forms in bound_forms.items()}
            variants = [(lib, False) for lib in libraries]
            if "mtlkit" in libraries and workload_name in compiled_on:
                variants.insert(1, ("mtlkit", True))
            specs = {library + (" (compiled)" if compiled else ""):
                     {"library": library, "workload": workload_name, "model": model_name, "steps": steps,
                      "warmup": 1 if args.tiny else 3, "compile": compiled, "batch_size": batch_size,
                      "rows": 512 if args.tiny else None, "device": args.device}
                     for library, compiled in variants}
            for _ in range(1 if args.tiny else args.rounds):
                measured = _measure_round(specs, entry["windows_per_round"], bound)
                for kind, rates in measured.pop(GEMM_BOUND, {}).items():
                    entry["gemm_bound_windows"][kind] += rates
                for key, result in measured.items():
                    slot = entry["libraries"].setdefault(key, {k: [] for k in KINDS} | {"peak_rss_mb": []})
                    if "error" in result:
                        slot["error"] = result["error"]
                        continue
                    for kind in KINDS:
                        slot[kind] += result[kind]
                    slot["peak_rss_mb"].append(result["peak_rss_mb"])
                    if "peak_gpu_memory_mb" in result:
                        slot.setdefault("peak_gpu_memory_mb", []).append(result["peak_gpu_memory_mb"])
            _summarise_entry(entry)
            report["results"].append(entry)
            _print_entry(entry)
    report["seconds"] = time.perf_counter() - started
    report["round_drift"] = round_drift(report["results"])
    report["targets"] = judge(report) if on_cpu else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    _print_summary(report)
    if on_cpu:
        print_verdicts(report["targets"], console)
    _print_drift(report["round_drift"])
    console.print(f"wrote {out} ({report['seconds']:.0f} s)")
    return report


def _summarise_entry(entry: dict) -> None:
    for kind, rates in entry.get("gemm_bound_windows", {}).items():
        if rates:  # the bound as the trainer is measured: the median of windows taken beside the libraries'
            entry[gemm_bound_key(kind, interleaved=True)] = statistics.median(rates)
    for slot in entry["libraries"].values():
        if "error" in slot and not slot["trainer"]:
            continue
        for kind in KINDS:
            values = slot[kind]
            slot[f"{kind}_median"] = statistics.median(values)
            slot[f"{kind}_min"], slot[f"{kind}_max"] = min(values), max(values)
        slot["peak_rss_mb_max"] = max(slot["peak_rss_mb"])
        if "peak_gpu_memory_mb" in slot:
            slot["peak_gpu_memory_mb_max"] = max(slot["peak_gpu_memory_mb"])
        slot["inference_share_of_roofline"] = slot["inference_median"] / entry["inference_roofline_samples_per_s"]
    for variant in MTLKIT_VARIANTS:
        ours = entry["libraries"].get(variant, {})
        if "trainer_median" in ours:
            derived = {"trainer_share_of_roofline": ours["trainer_median"] / entry["roofline_samples_per_s"],
                       "trainer_share_of_gemm_bound": gemm_bound_share(entry, ours),
                       "trainer_share_of_gemm_bound_pooled": _share(ours["trainer_median"], gemm_bound(entry, "trainer")),
                       "trainer_share_of_best_gemm_bound": _share(ours["trainer_median"], entry["gemm_bound_samples_per_s"]),
                       "trainer_share_of_model_alone": model_alone_share(entry, ours),
                       "trainer_share_of_model_alone_pooled": ours["trainer_median"] / ours["model_alone_median"]}
            for name, slot in entry["libraries"].items():
                if name not in MTLKIT_VARIANTS and "trainer_median" in slot:
                    derived[f"ratio_vs_{name}"] = {k: paired_ratio(ours, slot, k) for k in KINDS}
                    derived[f"ratio_vs_{name}"]["peak_rss"] = ours["peak_rss_mb_max"] / slot["peak_rss_mb_max"]
                    derived[f"ratio_vs_{name}_pooled"] = {k: ours[f"{k}_median"] / slot[f"{k}_median"] for k in KINDS}
                    derived[f"ratio_vs_{name}_by_round"] = {k: _ratios_by_round(ours[k], slot[k], entry.get("windows_per_round"))
                                                            for k in KINDS}
            # The default's at the top of the entry, the compiled variant's under its name.
            if variant == "mtlkit":
                entry.update(derived)
            else:
                entry.setdefault("variants", {})[variant] = derived


def _share(value: float, bound: float | None) -> float | None:
    return None if bound is None else value / bound


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


def _ratios_by_round(ours: list[float], theirs: list[float], windows: int | None) -> list[float]:
    """Median over median of each A B round: the two libraries measured back to back, so the spread
    of these ratios shows how much the machine moved within the run."""
    if not windows or len(ours) != len(theirs) or len(ours) % windows:
        return []
    return [statistics.median(ours[i : i + windows]) / statistics.median(theirs[i : i + windows])
            for i in range(0, len(ours), windows)]


def round_drift(results: list[dict]) -> dict | None:
    """How far mtlkit's own trainer rate moved between the A B rounds of the run, the host's drift:
    the same code on the same data, so any change is the machine's. Returns the largest spread,
    ``max / min - 1`` of the rounds' median rates, with the entry it was seen on and those medians
    (None with fewer than two rounds)."""
    worst = None
    for entry in results:
        windows = entry.get("windows_per_round")
        rates = entry["libraries"].get("mtlkit", {}).get("trainer", [])
        if not windows or len(rates) < 2 * windows or len(rates) % windows:
            continue
        medians = [statistics.median(rates[i : i + windows]) for i in range(0, len(rates), windows)]
        spread = max(medians) / min(medians) - 1
        if worst is None or spread > worst["spread"]:
            worst = {"spread": spread, "workload": entry["workload"], "model": entry["model"], "round_medians": medians}
    return worst


# Above this spread between rounds the host, not the code, moves the ratios by more than the targets' margins.
NOISY_DRIFT = 0.10


def _print_drift(drift: dict | None) -> None:
    if drift is None:
        return
    rounds = ", ".join(f"{m:,.0f}/s" for m in drift["round_medians"])
    line = (f"host drift: mtlkit's own trainer rate moved by up to {100 * drift['spread']:.0f} % between rounds "
            f"({drift['workload']} {drift['model']}: {rounds})")
    if drift["spread"] > NOISY_DRIFT:
        console.print(f"[yellow]{line}; the machine changed speed during the run: where a target's by-round ratios fall "
                      "on both sides of its line, this run does not decide it (rerun with more --rounds)[/]")
    else:
        console.print(line)


def _print_entry(entry: dict) -> None:
    def bound(measure: str) -> str:
        best = entry[gemm_bound_key(measure)]
        median = gemm_bound(entry, measure)
        return _rate(best) if median == best else f"{_rate(median)} (best-of {_rate(best)})"

    table = Table(title=f"{entry['workload']} {entry['model']}: {entry['flops_per_sample'] / 1e3:.1f} kFLOP/sample (train), "
                        f"roofline {_rate(entry['roofline_samples_per_s'])}, GEMM-only bound {bound('trainer')}; "
                        f"inference {entry['inference_flops_per_sample'] / 1e3:.1f} kFLOP/sample, roofline "
                        f"{_rate(entry['inference_roofline_samples_per_s'])}, GEMM-only bound {bound('inference')}")
    gpu = any("peak_gpu_memory_mb_max" in slot for slot in entry["libraries"].values())
    columns = ["library", "trainer samples/s (median, min-max)", "model alone", "inference", "inference % roofline",
               "peak RSS MB"] + (["peak GPU MB"] if gpu else [])
    for column in columns:
        table.add_column(column, justify="right" if column != "library" else "left")
    for name, slot in entry["libraries"].items():
        if "trainer_median" not in slot:
            table.add_row(name, slot.get("error", "no result"), *[""] * (len(columns) - 2))
            continue
        table.add_row(name, f"{slot['trainer_median']:,.0f} ({slot['trainer_min']:,.0f}-{slot['trainer_max']:,.0f})",
                      f"{slot['model_alone_median']:,.0f}", f"{slot['inference_median']:,.0f}",
                      f"{100 * slot['inference_share_of_roofline']:.0f}%", f"{slot['peak_rss_mb_max']:.0f}",
                      *([f"{slot['peak_gpu_memory_mb_max']:.0f}"] if gpu else []))
    console.print(table)


def _print_summary(report: dict) -> None:
    table = Table(title="mtlkit relative to the references (medians of the turns' window ratios; RSS: lower is better)")
    for column in ("workload", "model", "trainer /s", "% roofline", "% GEMM bound", "trainer/model alone",
                   "train x rechub", "train x deepctr", "infer x best ref", "infer % roofline (best ref)", "RSS / best ref"):
        table.add_column(column, justify="right")
    for e in report["results"]:
        refs = {n: s for n, s in e["libraries"].items() if n in ("torch_rechub", "deepctr_torch") and "trainer_median" in s}
        best_ref = max(refs.values(), key=lambda s: s["inference_median"], default=None)
        best_infer = best_ref and best_ref["inference_median"]
        best_rss = min((s["peak_rss_mb_max"] for s in refs.values()), default=None)
        for variant in MTLKIT_VARIANTS:
            ours = e["libraries"].get(variant, {})
            if "trainer_median" not in ours:
                continue
            derived = variant_shares(e, variant)
            def cell(name: str) -> str:  # a ratio to that library, or why there is none
                if f"ratio_vs_{name}" in derived:
                    return f"{derived[f'ratio_vs_{name}']['trainer']:.2f}x"
                return e["libraries"].get(name, {}).get("error", "-")[:28]

            table.add_row(e["workload"], e["model"] + variant[len("mtlkit"):], f"{ours['trainer_median']:,.0f}",
                          _percent(derived['trainer_share_of_roofline']), _percent(derived['trainer_share_of_gemm_bound']),
                          f"{100 * derived['trainer_share_of_model_alone']:.0f}%", cell("torch_rechub"), cell("deepctr_torch"),
                          f"{paired_ratio(ours, best_ref, 'inference'):.2f}x" if best_infer else "-",
                          f"{100 * ours['inference_share_of_roofline']:.0f}%"
                          + (f" ({100 * best_ref['inference_share_of_roofline']:.0f}%)" if best_ref else ""),
                          f"{ours['peak_rss_mb_max'] / best_rss:.2f}" if best_rss else "-")
    console.print(table)


if __name__ == "__main__":
    main()
