"""The benchmark suite runs end to end on a tiny size (timings are not tested: they belong to the suite)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from in_process import run_module

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_suite_runs_on_a_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--tiny", "--workloads", "W2", "--models", "mmoe,stem",
                           "--libraries", "mtlkit", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    entry = report["results"][0]
    assert entry["workload"] == "W2" and entry["model"] == "mmoe"
    # The analytic cost of W2's MMoE: 3 x forward GEMM FLOPs, about 5.03 MFLOP per training sample.
    assert abs(entry["flops_per_sample"] - 5.03e6) / 5.03e6 < 0.02
    # Inference is the forward alone: a third of that (backward = 2 x forward for every GEMM).
    assert abs(entry["inference_flops_per_sample"] - 5.03e6 / 3) / (5.03e6 / 3) < 0.02
    # The bound and the roofline come from separate timings, which a busy machine can skew by 2x or
    # more, so these margins are wide: they catch a bound timed on the wrong GEMMs or in wrong units.
    # A forward holds a third of a training step's GEMM work, so its bound is higher.
    assert entry["gemm_bound_samples_per_s"] < entry["inference_gemm_bound_samples_per_s"] < entry["inference_roofline_samples_per_s"] * 10
    ours = entry["libraries"]["mtlkit"]
    assert ours["trainer_median"] > 0 and ours["inference_median"] > 0 and ours["peak_rss_mb_max"] > 0
    assert ours["inference_share_of_roofline"] == ours["inference_median"] / entry["inference_roofline_samples_per_s"]
    assert report["machine"]["matmul_peak_gflops"] > 0
    assert report["machine"]["cpu"]  # results are comparable only on the same CPU
    # The run is judged against issue 4's targets: W2 MMoE's ratio targets need references, its
    # shares do not.
    verdicts = {v["target"]: v for v in report["targets"] if v["model"] == "mmoe"}
    assert verdicts["trainer >= 80 % of GEMM-only bound"]["measured"] == entry["trainer_share_of_gemm_bound"]
    # The share is of the bound's own windows, taken beside the trainer's (one round of one window here).
    assert [len(entry["gemm_bound_windows"][kind]) for kind in ("trainer", "inference")] == [1, 1]
    assert entry["gemm_bound_interleaved_samples_per_s"] == entry["gemm_bound_windows"]["trainer"][0] > 0
    assert entry["trainer_share_of_gemm_bound"] == ours["trainer_median"] / entry["gemm_bound_interleaved_samples_per_s"]
    assert entry["trainer_share_of_best_gemm_bound"] == ours["trainer_median"] / entry["gemm_bound_samples_per_s"]
    assert verdicts["trainer >= 80 % of GEMM-only bound"]["measured_against_best_bound"] == entry["trainer_share_of_best_gemm_bound"]
    assert verdicts["trainer >= 2.2x torch_rechub"]["status"] == "not judged: torch_rechub not measured"
    # STEM's embedding copies add lookups, not GEMMs: its experts cost what MMoE's eight do.
    stem = report["results"][1]
    assert stem["model"] == "stem" and stem["libraries"]["mtlkit"]["trainer_median"] > 0
    assert abs(stem["flops_per_sample"] - 5.03e6) / 5.03e6 < 0.02


def test_compiled_variant_is_measured_and_judged_on_its_own(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--tiny", "--workloads", "W1", "--models", "ple",
                           "--libraries", "mtlkit", "--compile", "W1", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    entry = json.loads(out.read_text())["results"][0]
    compiled = entry["libraries"]["mtlkit (compiled)"]
    assert "error" not in compiled and compiled["trainer_median"] > 0 and compiled["model_alone_median"] > 0
    shares = entry["variants"]["mtlkit (compiled)"]
    assert shares["trainer_share_of_model_alone"] == compiled["trainer_median"] / compiled["model_alone_median"]
    eager = entry["libraries"]["mtlkit"]
    assert entry["trainer_share_of_model_alone"] == eager["trainer_median"] / eager["model_alone_median"]
    verdicts = [v for v in json.loads(out.read_text())["targets"] if v["target"] == "trainer >= 90 % of model alone"]
    assert {v["mtlkit"]: v["measured"] for v in verdicts} == {
        "mtlkit": entry["trainer_share_of_model_alone"], "mtlkit (compiled)": shares["trainer_share_of_model_alone"]}


def test_summary_of_a_model_mtlkit_failed_on_keeps_the_references():
    from benchmarks.run import _summarise_entry

    measured = {"trainer": [10.0, 12.0], "model_alone": [20.0, 22.0], "inference": [40.0, 44.0], "peak_rss_mb": [100.0, 90.0]}
    entry = {"roofline_samples_per_s": 100.0, "gemm_bound_samples_per_s": 50.0, "inference_roofline_samples_per_s": 84.0,
             "libraries": {"mtlkit": {"trainer": [], "model_alone": [], "inference": [], "peak_rss_mb": [], "error": "boom"},
                           "torch_rechub": measured}}
    _summarise_entry(entry)
    assert entry["libraries"]["torch_rechub"]["inference_share_of_roofline"] == 0.5  # median 42 of 84
    assert "ratio_vs_torch_rechub" not in entry and "trainer_share_of_roofline" not in entry


def test_peak_rss_is_the_measuring_process_own_not_its_parents():
    # Linux's ru_maxrss survives fork + exec: a child of a 400 MB parent would report 400 MB.
    ballast = torch.ones(100_000_000)  # noqa: F841 (400 MB resident in this process)
    child = subprocess.run([sys.executable, "-c", "from benchmarks.measure import peak_rss_mb; print(peak_rss_mb())"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert 0 < float(child.stdout) < 300


def test_w1_mmoe_costs_what_the_issue_says():
    from benchmarks.libraries import build_mtlkit
    from benchmarks.machine import step_profile
    from benchmarks.workloads import WORKLOADS, make_data
    from mtlkit.objectives import FixedWeighting, task_losses

    workload = WORKLOADS["W1"]
    model, tasks, batch = build_mtlkit(workload, "mmoe", make_data(workload, workload.batch_size))
    weighting = FixedWeighting(tasks)

    def step():
        weighting(task_losses(model(batch.inputs), batch.labels, batch.label_mask, tasks))[0].backward()

    flops, calls = step_profile(step)
    forward = 2 * 100 * 128 + 2 * 100 * 16 + 2 * 2 * 8 * 16 + 2 * 2 * (16 * 8 + 8 * 1)  # experts, gates, mixing, towers
    # The issue's nominal 88 k is 3 x forward; W1's raw input needs no gradient, so the first layer's
    # input gradient (experts and gates) is never computed.
    assert 3 * forward == 89_568
    # With 8 experts of width 16 the mixing's expert gradient is two multiply-adds, not a bmm, and
    # FlopCounterMode counts matmuls only: those 2 x 2 x 8 x 16 FLOPs are done but not counted.
    assert flops / workload.batch_size == 3 * forward - 2 * 100 * (128 + 16) - 2 * 2 * 8 * 16
    assert len(calls) > 0


def test_batched_formulations_agree_with_the_reference_loop():
    """The fast path (stacked experts, one gate matmul, one tower bmm) equals a plain per-expert loop."""
    from mtlkit.models import MLP, build_model

    model = build_model("mmoe", input_dim=100, tasks=["a", "b"], num_experts=8, expert_hidden=[16], tower_hidden=[8])
    x = torch.randn(64, 100)
    experts = []
    for e in range(8):
        mlp = MLP(100, (16,))
        with torch.no_grad():
            mlp.layers[0].weight.copy_(model.experts.linears[0].stack_weight(e).T)
            mlp.layers[0].bias.copy_(model.experts.linears[0].bias[e])
        experts.append(mlp)
    expert_out = torch.stack([m(x) for m in experts], 1)
    gate_w = model.gates.linear.weight.view(100, 2, 8)
    outputs = {}
    for k, name in enumerate(["a", "b"]):
        gate = torch.softmax(x @ gate_w[:, k] + model.gates.linear.bias[k], -1)
        mixed = (gate.unsqueeze(-1) * expert_out).sum(1)
        tower = model.towers.net
        hidden = torch.relu(mixed @ tower.linears[0].weight[k] + tower.linears[0].bias[k])
        outputs[name] = hidden @ tower.linears[1].weight[k] + tower.linears[1].bias[k]
    for name, value in model(x).items():
        torch.testing.assert_close(value, outputs[name], atol=1e-5, rtol=1e-5)


def test_data_path_cost_runs_on_a_tiny_size(tmp_path):
    out = tmp_path / "data_path.json"
    done = run_module("benchmarks.data_path_cost", "--batches", "2", "--steps", "2", "--rounds", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["rows"] == 2 * report["batch_size"]
    from benchmarks.data_path_cost import VARIANTS

    assert list(report["seconds"]) == list(VARIANTS)
    assert all(len(values) == 1 and values[0] > 0 for values in report["seconds"].values())
    assert "trainer's batches" in done.stdout


def test_gate_types_runs_on_a_tiny_size_with_the_gates_it_names(tmp_path):
    from benchmarks.gate_types import VARIANTS
    from benchmarks.libraries import build_mtlkit
    from benchmarks.workloads import WORKLOADS, make_data
    from mtlkit.models import DSelectKGateBank

    out = tmp_path / "gates.json"
    done = run_module("benchmarks.gate_types", "--steps", "2", "--rounds", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert list(report["seconds"]) == list(VARIANTS)
    assert all(len(values) == 1 and values[0] > 0 for values in report["seconds"].values())
    workload = WORKLOADS["W1"]
    data = make_data(workload, 8)
    for name, options in VARIANTS.items():
        model, _, _ = build_mtlkit(workload, "mmoe", data, **options)
        assert isinstance(model.gates, DSelectKGateBank) == name.startswith("dselect")
        assert model.gates.top_k == options.get("gate_top_k")
        assert model.gates.dropout == options.get("gate_dropout", 0.0)
        assert (model.gates.linear.in_features == 0) == name.endswith("task")


def test_profile_step_counts_the_rows_its_steps_really_read():
    from benchmarks.profile_step import samples_seen

    # Two full batches, the epoch's partial one (452 rows), then the next epoch's first.
    assert samples_seen(2500, 1024, 4) == 1024 + 1024 + 452 + 1024
    assert samples_seen(45, 1024, 3) == 3 * 45  # a table smaller than a batch
    done = run_module("benchmarks.profile_step", "--workload", "W1", "--model", "mmoe", "--steps", "3", "--rows", "45")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(45 rows a step on average)" in done.stdout
    assert "_SmallMixture" in done.stdout  # the profiler's table of the step's operators


def test_step_glue_checks_its_functions_against_the_model_and_runs(tmp_path):
    # The script exits non-zero when a hand-written step's loss or gradients differ from the model's
    # (exactly for the same ops, to 1e-5 for the batch-last ones), so this also keeps it truthful.
    out = tmp_path / "glue.json"
    done = run_module("benchmarks.step_glue", "--steps", "2", "--rounds", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    from benchmarks.step_glue import VARIANTS

    timings = json.loads(out.read_text())
    assert list(timings) == list(VARIANTS)
    assert all(len(values) == 1 and values[0] > 0 for values in timings.values())


def _slot(trainer: float, inference: float, rss: float) -> dict:
    return {"trainer_median": trainer, "model_alone_median": trainer, "inference_median": inference, "peak_rss_mb_max": rss}


def test_targets_say_how_far_a_miss_is_from_the_roofline():
    from benchmarks.targets import Target, judge_entry

    entry = {"workload": "W2", "model": "ple", "roofline_samples_per_s": 300.0, "gemm_bound_samples_per_s": 250.0,
             "inference_roofline_samples_per_s": 900.0, "inference_gemm_bound_samples_per_s": 800.0,
             "trainer_share_of_gemm_bound": 230 / 250, "trainer_share_of_model_alone": 1.0,
             "libraries": {"mtlkit": _slot(230.0, 700.0, 90.0), "torch_rechub": _slot(100.0, 600.0, 100.0),
                           "deepctr_torch": {"trainer": [], "error": "IndexError: index 2 is out of range"}},
             "ratio_vs_torch_rechub_by_round": {"trainer": [2.1, 2.5], "inference": [1.2, 1.1]}}
    met = judge_entry(entry, Target("W2", None, "trainer", 2.2, "torch_rechub"))
    assert met["status"] == "met" and met["measured"] == 2.3
    assert met["measured_by_round"] == [2.1, 2.5] and met["rounds_met"] == 1
    assert met["needed_share_of_roofline"] == pytest.approx(220 / 300) and met["reference_share_of_roofline"] == 100 / 300
    assert judge_entry(entry, Target("W2", None, "trainer", 2.4, "torch_rechub"))["status"] == "missed"
    assert judge_entry(entry, Target("W2", None, "trainer", 2.6, "best"))["status"] == "missed: beyond the GEMM-only bound"
    beyond = judge_entry(entry, Target("W2", None, "trainer", 8.0, "best"))
    assert beyond["status"] == "missed: beyond the roofline" and beyond["needed_share_of_roofline"] == pytest.approx(800 / 300)
    # Inference is judged against the inference roofline, with the reference that infers fastest.
    inference = judge_entry(entry, Target("W2", None, "inference", 1.3, "best"))
    assert inference["reference"] == "torch_rechub" and inference["status"] == "missed"
    assert inference["needed_samples_per_s"] == pytest.approx(780) and inference["needed_share_of_gemm_bound"] == pytest.approx(780 / 800)
    crashed = judge_entry(entry, Target("W2", None, "trainer", 1.4, "deepctr_torch"))
    assert crashed["status"] == "not judged: deepctr_torch: IndexError: index 2 is out of range"
    assert judge_entry(entry, Target("W2", None, "peak_rss", 1.0, "best"))["measured"] == 0.9
    share = judge_entry(entry, Target("W2", None, "gemm_bound_share", 0.95))
    assert share["status"] == "missed" and share["measured"] == 230 / 250


def test_ratio_targets_pair_each_turns_windows():
    """The verdict's ratio is the median of each turn's ratio (mtlkit's window over the reference's,
    seconds apart): here 3, 2, 2 in a fast round and again in one at half speed, so 2.0x. The medians
    over all windows pick windows from different turns and rounds (175 / 81.25, 2.15x): reported beside,
    not judged on. Here that would have met a 2.1x target that the turns miss."""
    from benchmarks.targets import Target, judge_entry, paired_ratio

    ours = {"trainer": [300.0, 200.0, 250.0, 150.0, 100.0, 125.0], "trainer_median": 175.0, "model_alone_median": 175.0}
    theirs = {"trainer": [100.0, 100.0, 125.0, 50.0, 50.0, 62.5], "trainer_median": 81.25, "model_alone_median": 81.25}
    assert paired_ratio(ours, theirs, "trainer") == 2.0
    assert paired_ratio(ours, {**theirs, "trainer": theirs["trainer"][:5]}, "trainer") == 175.0 / 81.25  # unpaired
    entry = {"workload": "W2", "model": "mmoe", "roofline_samples_per_s": 1000.0, "gemm_bound_samples_per_s": 500.0,
             "libraries": {"mtlkit": ours, "torch_rechub": theirs}}
    verdict = judge_entry(entry, Target("W2", None, "trainer", 2.1, "torch_rechub"))
    assert verdict["status"] == "missed" and verdict["measured"] == 2.0
    assert verdict["measured_pooled"] == pytest.approx(2.1538, abs=1e-4)


def test_a_stored_gpu_run_gets_no_verdicts(tmp_path, capsys):
    from benchmarks.targets import main

    gpu_run = ROOT / "benchmarks" / "results_gpu_w2.json"  # a real --device cuda report: no GEMM-only bound
    assert json.loads(gpu_run.read_text())["machine"]["device"] == "cuda"
    assert main([str(gpu_run)]) == []
    assert "issue 4's targets are the CPU's" in capsys.readouterr().out


def test_ratios_by_round_pair_each_round_of_the_two_libraries():
    from benchmarks.run import _ratios_by_round

    ours, theirs = [10.0, 12.0, 11.0, 30.0, 20.0, 20.0], [5.0, 5.0, 6.0, 10.0, 8.0, 40.0]
    assert _ratios_by_round(ours, theirs, 3) == [11.0 / 5.0, 20.0 / 10.0]
    assert _ratios_by_round(ours, theirs[:3], 3) == []  # a round that failed on one side pairs nothing


def test_a_round_takes_windows_from_the_libraries_in_turn_reversing_the_order(monkeypatch):
    from benchmarks import run

    calls = []

    class Recording:  # stands in for a measuring process
        def __init__(self, spec):
            self.name, self.error = spec["library"], "boom" if spec["library"] == "broken" else None

        def window(self, kind):
            calls.append((self.name, kind))
            return None if self.error else float(len(calls))

        def finish(self):
            calls.append((self.name, "finish"))
            return {"error": "process failed: []"} if self.name == "died" else {"peak_rss_mb": 1.0}

    monkeypatch.setattr(run, "_MeasuringProcess", Recording)
    results = run._measure_round({"a": {"library": "a"}, "b": {"library": "b"}, "broken": {"library": "broken"},
                                  "died": {"library": "died"}}, windows=2)
    assert results["died"] == {"error": "process failed: []"}  # its windows answered, then it crashed
    taken = [(name, kind) for name, kind in calls if name in ("a", "b") and kind != "finish"]
    # The kinds follow each other turn by turn: a trainer window and the model-alone window of the same
    # index are a turn apart (the 90 % share pairs them), and each kind's order still alternates.
    assert taken == [("a", "trainer"), ("b", "trainer"), ("b", "model_alone"), ("a", "model_alone"),
                     ("a", "inference"), ("b", "inference"), ("b", "trainer"), ("a", "trainer"),
                     ("a", "model_alone"), ("b", "model_alone"), ("b", "inference"), ("a", "inference")]
    assert {name for name, kind in calls if kind == "finish"} == {"a", "b", "broken", "died"}
    assert results["broken"] == {"error": "boom"}
    assert results["a"]["trainer"] == [1.0, 16.0] and results["b"]["model_alone"] == [7.0, 18.0]
    assert results["a"]["peak_rss_mb"] == 1.0


def test_the_gemm_bound_takes_its_turn_beside_the_libraries_windows(monkeypatch):
    from benchmarks import run

    calls = []

    class Recording:  # stands in for a measuring process
        def __init__(self, spec):
            self.name, self.error = spec["library"], None

        def window(self, kind):
            calls.append((self.name, kind))
            return 1.0

        def finish(self):
            return {"peak_rss_mb": 1.0}

    def bound_window(kind):
        return lambda: calls.append(("bound", kind)) or 5.0

    monkeypatch.setattr(run, "_MeasuringProcess", Recording)
    monkeypatch.setattr(run, "WINDOW_PAUSE_SECONDS", 0.0)
    results = run._measure_round({"a": {"library": "a"}, "b": {"library": "b"}}, windows=2,
                                 bound={"trainer": bound_window("trainer"), "inference": bound_window("inference")})
    assert calls == [("a", "trainer"), ("b", "trainer"), ("bound", "trainer"), ("b", "model_alone"), ("a", "model_alone"),
                     ("a", "inference"), ("b", "inference"), ("bound", "inference"),
                     ("bound", "trainer"), ("b", "trainer"), ("a", "trainer"), ("a", "model_alone"), ("b", "model_alone"),
                     ("bound", "inference"), ("b", "inference"), ("a", "inference")]
    assert results[run.GEMM_BOUND] == {"trainer": [5.0, 5.0], "inference": [5.0, 5.0]}
    assert set(results) == {"a", "b", run.GEMM_BOUND}


def test_a_gemm_bound_window_runs_each_gemm_its_steps_in_a_row():
    from benchmarks.machine import gemm_bound_window
    from benchmarks.targets import gemm_bound

    ran = []
    rate = gemm_bound_window([lambda: ran.append("first"), lambda: ran.append("second")], samples_per_step=64, steps=3)()
    assert ran == ["first"] * 3 + ["second"] * 3 and rate > 0
    best_only = {"gemm_bound_samples_per_s": 100.0, "inference_gemm_bound_samples_per_s": 300.0}
    assert gemm_bound(best_only) == 100.0 and gemm_bound(best_only, "inference") == 300.0  # a report from before the windows
    both = {**best_only, "gemm_bound_interleaved_samples_per_s": 80.0, "inference_gemm_bound_interleaved_samples_per_s": 270.0}
    assert gemm_bound(both) == 80.0 and gemm_bound(both, "inference") == 270.0
    assert gemm_bound({"gemm_bound_samples_per_s": None}) is None  # a GPU run


def test_measuring_processes_answer_windows_and_a_failed_set_up_is_a_result():
    from benchmarks.run import _measure_round

    spec = {"library": "mtlkit", "workload": "W1", "model": "mmoe", "steps": 2, "warmup": 1, "compile": False,
            "batch_size": 64, "rows": 256, "device": "cpu"}
    results = _measure_round({"mtlkit": spec, "no such model": {**spec, "model": "no_such_model"}}, windows=2)
    ours = results["mtlkit"]
    assert all(len(ours[kind]) == 2 and min(ours[kind]) > 0 for kind in ("trainer", "model_alone", "inference"))
    assert ours["peak_rss_mb"] > 0
    assert "no_such_model" in results["no such model"]["error"]


def test_gemm_backends_times_each_gemm_of_the_step_through_both_libraries(tmp_path):
    from benchmarks.gemm_backends import onednn_version
    from mtlkit.models import cpu_gemm
    from mtlkit.models.cpu_gemm import onednn_matmul

    if not cpu_gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    torch.testing.assert_close(onednn_matmul(a, b), a @ b)
    stacked_a, stacked_b = torch.randn(2, 5, 7), torch.randn(2, 7, 3).transpose(1, 2).contiguous().transpose(1, 2)
    products = onednn_version(torch.ops.aten.bmm.default, [stacked_a, stacked_b])()
    torch.testing.assert_close(torch.stack(products), torch.bmm(stacked_a, stacked_b))
    shared_first = onednn_version(torch.ops.aten.bmm.default, [a.expand(2, 5, 7), stacked_b])()  # expanded along the batch
    torch.testing.assert_close(torch.stack(shared_first), torch.bmm(a.expand(2, 5, 7), stacked_b))
    sliced = torch.randn(2, 7, 6)[:, :, :3]  # second operands out of wider rows: oneDNN's slow path
    assert onednn_version(torch.ops.aten.bmm.default, [stacked_a, sliced]) is None
    out = tmp_path / "gemm_backends.json"
    done = run_module("benchmarks.gemm_backends", "--workload", "W2", "--model", "mmoe", "--batch-size", "64",
                      "--repeats", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert all(g["mkl_ms"] > 0 for g in report["gemms"]) and any(g["op"] == "mm" and g["onednn_ms"] for g in report["gemms"])
    assert report["faster_of_two_ms"] <= min(report["mkl_ms"], report["onednn_ms"]) + 1e-9
    assert "the faster of the two for each" in done.stdout


def test_the_gemm_bound_times_a_batch_sharing_its_first_operand_as_one_gemm():
    from benchmarks.machine import _single_gemm_shape

    aten = torch.ops.aten
    assert _single_gemm_shape(aten.mm.default, ((2048, 272), (272, 2056)), ((272, 1), (2056, 1))) == (2048, 272, 2056)
    assert _single_gemm_shape(aten.addmm.default, ((16, 1), (16, 271), (271, 2048)), ((1, 1), (271, 1), (2048, 1))) == (16, 271, 2048)
    # W2's first-layer weight gradient: X^T expanded over 8 stacks (stride 0), so X^T @ [G_1 ... G_8]
    shared = ((8, 272, 2048), (8, 2048, 256))
    assert _single_gemm_shape(aten.bmm.default, shared, ((0, 1, 272), (257, 2056, 1))) == (272, 2048, 8 * 256)
    assert _single_gemm_shape(aten.bmm.default, shared, ((557056, 2048, 1), (524288, 256, 1))) is None


def test_the_gemm_bound_also_times_a_batch_of_large_entries_as_one_onednn_call_each(monkeypatch):
    from benchmarks.machine import gemm_forms
    from mtlkit.models import cpu_gemm

    if not cpu_gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    aten = torch.ops.aten
    monkeypatch.setattr(cpu_gemm, "_MIN_ONEDNN_WORK", 1000)
    shapes = ((4, 32, 16), (4, 16, 8))  # 4096 multiply-adds an entry
    forms = gemm_forms(aten.bmm.default, shapes, ((512, 16, 1), (128, 8, 1)))
    assert len(forms) == 2
    torch.testing.assert_close(torch.stack(forms[1]()), forms[0]())
    monkeypatch.setattr(cpu_gemm, "_MIN_ONEDNN_WORK", 5000)  # too little work an entry
    assert len(gemm_forms(aten.bmm.default, shapes, ((512, 16, 1), (128, 8, 1)))) == 1
    mixing = ((2048, 8, 2), (2048, 2, 128))  # the mixing's small product per row: too many entries
    assert len(gemm_forms(aten.bmm.default, mixing, ((16, 2, 1), (256, 128, 1)))) == 1


def test_round_drift_is_mtlkits_own_largest_move_between_rounds():
    from benchmarks.run import round_drift

    def entry(model, trainer):
        return {"workload": "W1", "model": model, "windows_per_round": 2, "libraries": {"mtlkit": {"trainer": trainer}}}

    results = [entry("mmoe", [100.0, 110.0, 104.0, 106.0]),  # round medians 105 and 105: no move
               entry("omoe", [400.0, 420.0, 650.0, 610.0]),  # 410 then 630
               entry("ple", [50.0, 60.0])]  # one round: nothing to compare
    drift = round_drift(results)
    assert drift["model"] == "omoe" and drift["round_medians"] == [410.0, 630.0]
    assert math.isclose(drift["spread"], 630 / 410 - 1)
    assert round_drift([entry("ple", [50.0, 60.0])]) is None


def test_targets_cover_every_model_a_target_names():
    from benchmarks.targets import TARGETS, judge

    report = {"results": [{"workload": w, "model": m, "libraries": {}} for w in ("W1", "W2") for m in ("mmoe", "esmm")]}
    verdicts = judge(report)
    # W1 has no ESMM target but the every-model ones; a model mtlkit did not run on is not judged.
    assert {(v["workload"], v["model"]) for v in verdicts} == {(w, m) for w in ("W1", "W2") for m in ("mmoe", "esmm")}
    assert all(v["status"].startswith("not judged: mtlkit") for v in verdicts)
    assert len([v for v in verdicts if v["workload"] == "W2" and v["model"] == "esmm"]) == \
        len([t for t in TARGETS if t.workload == "W2" and (t.models is None or "esmm" in t.models)])


def test_fused_epilogue_checks_each_kernel_against_gemm_and_relu_and_runs(tmp_path):
    # The script exits non-zero when a fused kernel's output differs from GEMM + ReLU, so this also
    # keeps its comparison honest; inductor's variants are left out (with the reason) where it cannot build them.
    out = tmp_path / "epilogue.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.fused_epilogue", "--rows", "64", "--calls", "2", "--rounds", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    timings = json.loads(out.read_text())
    assert {"first layer: MKL mm alone", "first layer: MKL mm, then bias + ReLU pass", "second layer: MKL bmm alone",
            "second layer: MKL bmm, then ReLU pass", "gradient: MKL bmm alone", "gradient: MKL bmm, then mask pass",
            "mixing backward: MKL bmm, then masked move (mtlkit)", "mixing inference: bias + ReLU pass, then MKL bmm (mtlkit)"
            } <= set(timings)
    assert all(len(values) == 1 and values[0] > 0 for values in timings.values())
    for variant in ("first layer: oneDNN linear, ReLU post-op", "first layer: inductor template, frozen",
                    "second layer: inductor template", "gradient: inductor template, mask in epilogue",
                    "mixing backward: inductor loop", "mixing inference: inductor loop"):
        assert variant in timings or f"{variant}: not timed" in done.stdout


def test_precision_benchmark_runs_on_a_tiny_size(tmp_path):
    out = tmp_path / "precision.json"
    done = run_module("benchmarks.precision", "--workloads", "W1", "--steps", "6", "--repeats", "1", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    (entry,) = json.loads(out.read_text())
    assert entry["workload"] == "W1" and entry["model"] == "mmoe"
    assert all(len(v) == 1 and v[0] > 0 for v in entry["samples_per_s"].values())
    assert entry["bf16_over_fp32"] == entry["samples_per_s"]["bf16"][0] / entry["samples_per_s"]["fp32"][0]


def test_deepctr_torchs_crash_on_more_shared_than_task_experts_is_named():
    pytest.importorskip("deepctr_torch", reason="deepctr-torch is in benchmarks/requirements.txt, not installed here")
    from benchmarks.libraries import deepctr_session
    from benchmarks.workloads import WORKLOADS, make_data

    workload = WORKLOADS["W1"]
    with pytest.raises(RuntimeError, match="4 shared > 2 task experts"):
        deepctr_session(workload, "cgc", make_data(workload, rows=64), steps=1, warmup=0)


def test_gemm_in_step_records_and_retimes_onednns_linear_where_it_runs():
    from benchmarks.gemm_in_step import gemm_alone
    from benchmarks.machine import GemmRecorder
    from mtlkit.models import cpu_gemm

    if not cpu_gemm._onednn_available():
        pytest.skip("this torch has no oneDNN")
    a, b = torch.randn(512, 384), torch.randn(384, 512)  # 2^26.6 multiply-adds: above oneDNN's floor
    with cpu_gemm.forced_cpu_gemm_library("onednn"):
        default, with_onednn = GemmRecorder(), GemmRecorder(with_onednn=True)
        with default:
            cpu_gemm.matmul(a, b)
        with with_onednn:
            product = cpu_gemm.matmul(a, b)
    assert default.calls == []  # the bound's recorder (MKL forced there) is unchanged
    [(func, shapes, _, seconds)] = with_onednn.calls
    assert func.overloadpacket is torch.ops.mkldnn._linear_pointwise and seconds > 0
    assert shapes == ((512, 384), (512, 384))  # input [M, K], weight [N, K]
    assert gemm_alone(func, shapes)().shape == product.shape == (512, 512)
    mm_shapes = ((512, 384), (384, 512))
    assert gemm_alone(torch.ops.aten.mm.default, mm_shapes)().shape == (512, 512)


def test_the_bound_share_pairs_each_turns_windows():
    """The 80 % share is judged as the ratio targets are: the trainer's window over the bound's window of
    the same turn (0.85, 0.9, 0.825, 0.92 here, the host at half speed in the second and fourth turns),
    where the windows' medians (128.5 / 150) mix turns at both speeds."""
    from benchmarks.targets import Target, gemm_bound_share, judge_entry

    ours = {"trainer": [170.0, 90.0, 165.0, 92.0], "trainer_median": 128.5, "model_alone_median": 128.5}
    bound = [200.0, 100.0, 200.0, 100.0]
    entry = {"workload": "W2", "model": "ple", "gemm_bound_samples_per_s": 250.0, "gemm_bound_interleaved_samples_per_s": 150.0,
             "gemm_bound_windows": {"trainer": bound}, "libraries": {"mtlkit": ours}}
    assert gemm_bound_share(entry, ours) == pytest.approx(0.875)
    verdict = judge_entry(entry, Target("W2", None, "gemm_bound_share", 0.86))
    assert verdict["status"] == "met" and verdict["measured"] == pytest.approx(0.875)
    assert verdict["measured_pooled"] == 128.5 / 150.0 < 0.86  # the medians' share would have missed
    assert verdict["measured_against_best_bound"] == 128.5 / 250.0
    # Windows that do not pair (a variant that failed mid-run): the medians' share.
    assert gemm_bound_share({**entry, "gemm_bound_windows": {"trainer": bound[:3]}}, ours) == 128.5 / 150.0
    assert gemm_bound_share({"gemm_bound_samples_per_s": None}, ours) is None  # a GPU run


def test_several_runs_tally_each_targets_verdicts(tmp_path, capsys):
    from benchmarks.targets import main, tally

    def verdict(measured, status, model="mmoe", variant="mtlkit"):
        return {"workload": "W1", "model": model, "mtlkit": variant, "target": "trainer >= 8x torch_rechub",
                "measured": measured, "status": status}

    rows = tally([[verdict(8.7, "met"), verdict(0.0, "not judged: torch_rechub not measured", "ple")],
                  [verdict(7.3, "missed"), verdict(6.5, "missed", "ple")],
                  [verdict(7.99, "missed"), verdict(9.2, "met", variant="mtlkit (compiled)")]])
    assert [(r["model"], r["mtlkit"], r["judged"], r["met"], r["measured"]) for r in rows] == [
        ("mmoe", "mtlkit", 3, 1, [8.7, 7.3, 7.99]), ("ple", "mtlkit", 1, 0, [6.5]), ("mmoe", "mtlkit (compiled)", 1, 1, [9.2])]
    # The stored run twice: every target it judges is met in both or in neither, its range one value.
    stored = ROOT / "benchmarks" / "results.json"
    rows = main([str(stored), str(stored)])
    assert rows and all(r["judged"] == 2 and r["met"] in (0, 2) and r["measured"][0] == r["measured"][1] for r in rows)
    assert "over 2 runs" in capsys.readouterr().out


def test_the_model_alone_share_pairs_windows_a_turn_apart():
    """Where the kinds take turns, each trainer window is set against the model-alone window of the same
    index: 0.95, 0.9, 0.92, 0.85 here, the host at half speed for the second pair; the medians' share
    (137.5 / 150) mixes the two speeds. Older runs keep the medians' share."""
    from benchmarks.targets import Target, judge_entry, model_alone_share

    ours = {"trainer": [190.0, 90.0, 184.0, 85.0], "trainer_median": 137.5,
            "model_alone": [200.0, 100.0, 200.0, 100.0], "model_alone_median": 150.0}
    entry = {"workload": "W1", "model": "cgc", "kinds_take_turns": True, "libraries": {"mtlkit": ours}}
    assert model_alone_share(entry, ours) == pytest.approx(0.91)
    verdict = judge_entry(entry, Target("W1", None, "model_alone_share", 0.9))
    assert verdict["status"] == "met" and verdict["measured"] == pytest.approx(0.91)
    assert verdict["measured_pooled"] == 137.5 / 150.0 > 0.9
    missed = judge_entry(entry, Target("W1", None, "model_alone_share", 0.92))
    assert missed["status"] == "missed" and missed["measured_pooled"] < 0.92
    assert model_alone_share({"kinds_take_turns": False}, ours) == 137.5 / 150.0  # a run before the kinds took turns
    assert model_alone_share(entry, {**ours, "model_alone": [200.0, 100.0, 200.0]}) == 137.5 / 150.0  # unpaired
