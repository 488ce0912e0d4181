"""Issue 4's targets judged on one run of the suite, with what a missed one would need.

A ratio target (say, W2 PLE training at least 2.2x torch-rechub's) is judged on the median, over the
run's turns, of mtlkit's window over the reference's window of the same turn (:func:`paired_ratio`:
the A B pairs, seconds apart, so the host's drift cancels in each); the ratio of the two medians over
all windows is reported beside it. It asks for a throughput: the factor times the reference's median
in the same run. Set against that run's roofline (the measured matmul
peak spent on the model's FLOPs) and its GEMM-only bound (the model's GEMMs alone, at their real
shapes: the median of the bound's windows, taken in turn with the libraries' windows as a library's
would be, so the bound meets the host's drift as the trainer does; a report without such windows
falls back on the bound's best-of timing), that throughput says how far a miss is from the
machine's limits:

* above 100 % of the roofline, no fp32 implementation of the same maths reaches it on this machine
  at the measured peak ("beyond the roofline": out of reach);
* above 100 % of the GEMM-only bound, it would need the model's GEMMs to run faster than PyTorch runs
  them alone at these shapes, before any other work of the step ("beyond the GEMM-only bound");
* otherwise the miss is the code's.

The 80 % share of the GEMM-only bound is judged the same way (:func:`gemm_bound_share`): the median,
over the turns, of mtlkit's trainer window over the bound's window of the same turn; the share of the
windows' medians and that of the bound's best-of timing are reported beside it. The 90 % share of the
model alone (:func:`model_alone_share`) is the median of each trainer window over the model-alone window
of the same index, a turn later, in runs whose kinds take turns; the medians' share beside it.

The suite (``benchmarks.run``) judges every run and stores the verdicts under ``"targets"`` in its
JSON; a stored run can be judged again, and several runs at once give each target's count of runs met
and its range (:func:`tally`):

    python -m benchmarks.targets benchmarks/results.json
    python -m benchmarks.targets run1.json run2.json run3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

REFERENCES = ("torch_rechub", "deepctr_torch")
MIXTURES = ("mmoe", "cgc", "ple")  # "PLE and CGC the same ratios" as MMoE


@dataclass(frozen=True)
class Target:
    """One of the issue's targets.

    ``measure`` is ``"trainer"`` or ``"inference"`` (mtlkit's median over a reference's: at least
    ``factor`` times), ``"gemm_bound_share"`` or ``"model_alone_share"`` (mtlkit's trainer as a share
    of its GEMM-only bound or of its model alone: at least ``factor``), or ``"peak_rss"`` (mtlkit's
    peak RSS over the reference's: at most ``factor``). ``reference`` names a library, or ``"best"``:
    the installed reference that did best on that measure. ``models=None`` means every model.
    """

    workload: str
    models: tuple[str, ...] | None
    measure: str
    factor: float
    reference: str | None = None

    def describe(self) -> str:
        reference = "the best reference" if self.reference == "best" else self.reference
        if self.measure in ("trainer", "inference"):
            return f"{self.measure} >= {self.factor:g}x {reference}"
        if self.measure == "peak_rss":
            return f"peak RSS <= {self.factor:g}x {reference}"
        what = "GEMM-only bound" if self.measure == "gemm_bound_share" else "model alone"
        return f"trainer >= {100 * self.factor:.0f} % of {what}"


TARGETS = (
    Target("W1", MIXTURES, "trainer", 4.0, "deepctr_torch"),
    Target("W1", MIXTURES, "trainer", 8.0, "torch_rechub"),
    Target("W2", MIXTURES, "gemm_bound_share", 0.8),
    Target("W2", MIXTURES, "trainer", 1.4, "deepctr_torch"),
    Target("W2", MIXTURES, "trainer", 2.2, "torch_rechub"),
    Target("W2", MIXTURES, "inference", 1.3, "best"),
    Target("W2", ("esmm",), "trainer", 1.5, "best"),
    Target("W1", None, "model_alone_share", 0.9),
    Target("W2", None, "model_alone_share", 0.9),
    Target("W1", None, "peak_rss", 1.0, "best"),
    Target("W2", None, "peak_rss", 1.0, "best"),
)


def _reference(entry: dict, target: Target) -> tuple[str | None, dict | None, str | None]:
    """The reference library's name and measured slot, or why there is none."""
    measured = {name: slot for name, slot in entry["libraries"].items() if name in REFERENCES and "trainer_median" in slot}
    if target.reference == "best":
        if not measured:
            return None, None, "no reference measured"
        if target.measure == "peak_rss":
            name = min(measured, key=lambda n: measured[n]["peak_rss_mb_max"])
        else:
            name = max(measured, key=lambda n: measured[n][f"{target.measure}_median"])
        return name, measured[name], None
    if target.reference in measured:
        return target.reference, measured[target.reference], None
    slot = entry["libraries"].get(target.reference)
    return None, None, f"{target.reference}: {slot['error'][:60]}" if slot and "error" in slot else f"{target.reference} not measured"


def _median_of_pairs(mine: list[float], other: list[float], unpaired: float) -> float:
    """The median of ``mine[i] / other[i]``; ``unpaired`` where the two lists do not pair."""
    if mine and len(mine) == len(other):
        return statistics.median(a / b for a, b in zip(mine, other))
    return unpaired


def paired_ratio(ours: dict, theirs: dict, measure: str) -> float:
    """mtlkit's ``measure`` throughput (``trainer``, ``model_alone``, ``inference``) over a reference's:
    the median, over the turns, of mtlkit's window over the reference's window of the same turn (taken
    seconds apart). Where the windows do not pair (a stored run without them, a library that failed
    mid-run), the ratio of the two medians over all windows."""
    return _median_of_pairs(ours.get(measure) or [], theirs.get(measure) or [],
                            ours[f"{measure}_median"] / theirs[f"{measure}_median"])


def gemm_bound_key(measure: str, interleaved: bool = False) -> str:
    """The report's key of the GEMM-only bound for ``trainer`` or ``inference``: its best-of timing,
    or (``interleaved``) the median of its windows beside the libraries'."""
    prefix = "" if measure == "trainer" else f"{measure}_"
    return f"{prefix}gemm_bound{'_interleaved' if interleaved else ''}_samples_per_s"


def gemm_bound(entry: dict, measure: str = "trainer") -> float | None:
    """The GEMM-only bound (samples/s) a ``trainer`` or ``inference`` throughput of ``entry`` is set
    against: the median of its windows beside the libraries' where the run took them, else its
    best-of timing (the host's fastest moment); None where none was measured (a GPU run)."""
    return entry.get(gemm_bound_key(measure, interleaved=True)) or entry.get(gemm_bound_key(measure))


def gemm_bound_share(entry: dict, ours: dict, measure: str = "trainer") -> float | None:
    """mtlkit's ``measure`` throughput (``trainer`` or ``inference``) as a share of the GEMM-only bound,
    judged as the ratio targets are: the median, over the turns, of its window over the bound's window
    of the same turn (the bound takes its turn beside the libraries' since round 40). Where the windows
    do not pair (a run before that, a variant that failed mid-run), its median over the bound's
    (:func:`gemm_bound`); None where no bound was measured (a GPU run)."""
    bound = gemm_bound(entry, measure)
    if bound is None:
        return None
    windows = entry.get("gemm_bound_windows", {}).get(measure) or []
    return _median_of_pairs(ours.get(measure) or [], windows, ours[f"{measure}_median"] / bound)


def model_alone_share(entry: dict, ours: dict) -> float:
    """mtlkit's trainer throughput as a share of its model alone: where the run's kinds take turns
    (``kinds_take_turns``: a trainer window and the model-alone window of the same index a turn apart),
    the median of each such pair's ratio; in runs before that, or where the windows do not pair, the
    ratio of the two medians."""
    medians = ours["trainer_median"] / ours["model_alone_median"]
    return _median_of_pairs(ours["trainer"], ours["model_alone"], medians) if entry.get("kinds_take_turns") else medians


def variant_shares(entry: dict, variant: str) -> dict:
    """The shares and ratios ``benchmarks.run`` derived for one of mtlkit's variants: at the top of
    the entry for ``"mtlkit"``, under ``entry["variants"]`` for the others."""
    return entry if variant == "mtlkit" else entry["variants"][variant]


def judge_entry(entry: dict, target: Target, variant: str = "mtlkit") -> dict:
    """The verdict of ``target`` on one (workload, model) entry of the suite's report, for one of
    mtlkit's measured variants (``"mtlkit"``, its defaults, or ``"mtlkit (compiled)"``).

    Returns a dict with ``status`` (``"met"``, ``"missed"``, ``"missed: beyond the GEMM-only bound"``,
    ``"missed: beyond the roofline"`` or ``"not judged: <why>"``), judged on the medians of the run,
    ``measured`` and ``required`` (the ratio or share), and for throughput targets the ratio in each
    A B round and in how many rounds it was met, the throughput needed, its shares of the roofline
    and of the GEMM-only bound, and the reference's own share of the roofline.
    """
    verdict = {"workload": entry["workload"], "model": entry["model"], "mtlkit": variant, "target": target.describe()}
    ours = entry["libraries"].get(variant, {})
    if "trainer_median" not in ours:
        return {**verdict, "status": f"not judged: {variant} {ours.get('error', 'not measured')[:60]}"}
    verdict["required"] = target.factor
    if target.measure == "model_alone_share":
        verdict["measured"] = model_alone_share(entry, ours)
        verdict["measured_pooled"] = ours["trainer_median"] / ours["model_alone_median"]
        verdict["status"] = "met" if verdict["measured"] >= target.factor else "missed"
        return verdict
    if target.measure == "gemm_bound_share":
        # From the windows, so that a stored run is judged as a new one would be.
        verdict["measured"] = gemm_bound_share(entry, ours)
        if verdict["measured"] is None:
            return {**verdict, "status": "not judged: no GEMM-only bound measured"}
        verdict["measured_pooled"] = ours["trainer_median"] / gemm_bound(entry)
        verdict["status"] = "met" if verdict["measured"] >= target.factor else "missed"
        if entry.get("gemm_bound_samples_per_s"):
            verdict["measured_against_best_bound"] = ours["trainer_median"] / entry["gemm_bound_samples_per_s"]
        return verdict
    name, slot, why_not = _reference(entry, target)
    if slot is None:
        return {**verdict, "status": f"not judged: {why_not}"}
    verdict["reference"] = name
    if target.measure == "peak_rss":
        verdict["measured"] = ours["peak_rss_mb_max"] / slot["peak_rss_mb_max"]
        verdict["status"] = "met" if verdict["measured"] <= target.factor else "missed"
        return verdict
    measure = target.measure
    roofline_key = "roofline_samples_per_s" if measure == "trainer" else "inference_roofline_samples_per_s"
    needed = target.factor * slot[f"{measure}_median"]
    by_round = variant_shares(entry, variant).get(f"ratio_vs_{name}_by_round", {}).get(measure, [])
    verdict |= {
        "measured": paired_ratio(ours, slot, measure),
        "measured_pooled": ours[f"{measure}_median"] / slot[f"{measure}_median"],
        "measured_by_round": by_round,
        "rounds_met": sum(r >= target.factor for r in by_round),
        "needed_samples_per_s": needed,
        "needed_share_of_roofline": needed / entry[roofline_key],
        "needed_share_of_gemm_bound": needed / gemm_bound(entry, measure),
        "reference_share_of_roofline": slot[f"{measure}_median"] / entry[roofline_key],
    }
    if verdict["measured"] >= target.factor:
        verdict["status"] = "met"
    elif verdict["needed_share_of_roofline"] > 1:
        verdict["status"] = "missed: beyond the roofline"
    elif verdict["needed_share_of_gemm_bound"] > 1:
        verdict["status"] = "missed: beyond the GEMM-only bound"
    else:
        verdict["status"] = "missed"
    return verdict


def judge(report: dict, targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    """Every target's verdict on every (workload, model) of ``report`` it applies to, for mtlkit's
    defaults and every other variant measured there (its compiled one). Issue 4's targets are the
    CPU's: a report of another device (``--device cuda``) gets none."""
    if report.get("machine", {}).get("device", "cpu") != "cpu":
        return []
    verdicts = []
    for target in targets:
        for entry in report["results"]:
            if entry["workload"] == target.workload and (target.models is None or entry["model"] in target.models):
                for variant in ["mtlkit", *entry.get("variants", {})]:
                    verdicts.append(judge_entry(entry, target, variant))
    return verdicts


def _shown(target: str, measured: float) -> str:
    return f"{100 * measured:.0f}%" if "share" in target or "%" in target else f"{measured:.2f}x"


def print_verdicts(verdicts: list[dict], console: Console) -> None:
    """The verdicts as a table."""
    table = Table(title="issue 4's targets on this run (needs: the throughput the target asks for, as a share of "
                        "the roofline and of the GEMM-only bound; the reference's own share of the roofline)")
    for column in ("workload", "model", "target", "measured", "by round", "status", "needs % roofline",
                   "needs % GEMM bound", "reference % roofline"):
        table.add_column(column, justify="left" if column in ("target", "status") else "right")
    for v in verdicts:
        measured = v.get("measured")
        shown = "-" if measured is None else _shown(v["target"], measured)
        percent = lambda key: f"{100 * v[key]:.0f}%" if key in v else ""  # noqa: E731
        rounds = v.get("measured_by_round") or []
        by_round = " ".join(f"{r:.2f}x" for r in rounds) + (f" ({v['rounds_met']} met)" if rounds else "")
        if "measured_against_best_bound" in v:
            by_round = f"pooled {100 * v['measured_pooled']:.0f}%; {100 * v['measured_against_best_bound']:.0f}% of its best-of timing"
        elif "model alone" in v["target"]:
            by_round = f"pooled {100 * v['measured_pooled']:.0f}%"
        elif "measured_pooled" in v:
            by_round += f"; pooled {v['measured_pooled']:.2f}x"
        table.add_row(v["workload"], v["model"] + v.get("mtlkit", "mtlkit")[len("mtlkit"):], v["target"], shown, by_round,
                      v["status"], percent("needed_share_of_roofline"), percent("needed_share_of_gemm_bound"),
                      percent("reference_share_of_roofline"))
    console.print(table)


def tally(runs: list[list[dict]]) -> list[dict]:
    """Each target's verdicts over several runs (each run's :func:`judge`), in the order first seen: in
    how many runs it was judged and met, and the range of what was measured. On a host whose speed
    moves between runs, a target near its line is met in some runs and missed in others; this says how
    often, rather than what one run decided."""
    rows: dict[tuple, dict] = {}
    for verdicts in runs:
        for v in verdicts:
            row = rows.setdefault((v["workload"], v["model"], v.get("mtlkit", "mtlkit"), v["target"]),
                                  {"workload": v["workload"], "model": v["model"], "mtlkit": v.get("mtlkit", "mtlkit"),
                                   "target": v["target"], "judged": 0, "met": 0, "measured": []})
            if v["status"].startswith("not judged"):
                continue
            row["judged"] += 1
            row["met"] += v["status"] == "met"
            row["measured"].append(v["measured"])
    return [row for row in rows.values() if row["judged"]]


def print_tally(rows: list[dict], runs: int, console: Console) -> None:
    """:func:`tally`'s rows as a table."""
    table = Table(title=f"issue 4's targets over {runs} runs (met in how many of the runs that judged it; measured range)")
    for column in ("workload", "model", "target", "met", "measured (min-max)"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for row in rows:
        low, high = min(row["measured"]), max(row["measured"])
        table.add_row(row["workload"], row["model"] + row["mtlkit"][len("mtlkit"):], row["target"],
                      f"{row['met']} of {row['judged']}", f"{_shown(row['target'], low)}-{_shown(row['target'], high)}")
    console.print(table)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", default=["benchmarks/results.json"],
                        help="JSON reports of benchmarks.run; with several, each target's count of runs met and its range")
    args = parser.parse_args(argv)
    reports = [json.loads(Path(path).read_text()) for path in args.results]
    console = Console(width=200)
    if len(reports) > 1:
        rows = tally([judge(report) for report in reports])
        print_tally(rows, len(reports), console)
        return rows
    report = reports[0]
    verdicts = judge(report)
    if verdicts:
        print_verdicts(verdicts, console)
    else:
        print(f"no targets judged: issue 4's targets are the CPU's, and this run was on {report['machine'].get('device')!r}")
    return verdicts


if __name__ == "__main__":
    main()
