import json

import numpy as np
import pytest
import torch
import yaml

from mtlkit import ConfigError
from mtlkit.data.readers import read_table
from mtlkit.experiments.tabular_run import gate_usage_run, load_run, load_run_config, train_run
from mtlkit.models import build_model
from mtlkit.reports.gate_usage import GateUsageAccumulator, measure_gate_usage

from in_process import run_cli, run_example
from tables import SCHEMA, make_table


@pytest.mark.parametrize("name", ["omoe", "mmoe", "cgc", "ple", "adatt", "stem"])
def test_summaries_equal_the_recorded_weights_whatever_the_batching(name):
    torch.manual_seed(0)
    model = build_model(name, input_dim=7, tasks=["a", "b", "c"], num_experts=5) if name in ("omoe", "mmoe") else \
        build_model(name, input_dim=7, tasks=["a", "b", "c"], num_shared_experts=3, num_task_experts=2)
    x = torch.randn(300, 7)
    with model.recording_gates() as recorded:
        model.eval()(x)
    whole = measure_gate_usage(model, [x])
    chunked = measure_gate_usage(model, x.split(64))
    assert set(whole) == set(recorded)
    for path, weights in recorded.items():
        w = weights.double()
        for usage in (whole[path], chunked[path]):
            assert usage.rows == 300
            np.testing.assert_allclose(usage.mean_weight, w.mean(0).numpy(), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(usage.mean_weight.sum(1), 1.0, rtol=1e-6)
            top = torch.nn.functional.one_hot(w.argmax(-1), w.shape[-1]).double().mean(0)
            np.testing.assert_allclose(usage.top_share, top.numpy())
            entropy = -(torch.special.xlogy(w, w).sum(-1)).mean(0).numpy() / np.log(usage.choices.sum(1))
            np.testing.assert_allclose(usage.row_entropy, entropy, rtol=1e-6)
            assert (usage.mean_weight[~usage.choices] == 0).all()
            np.testing.assert_allclose(usage.experts_per_row, (w > 0).sum(-1).double().mean(0).numpy())
            np.testing.assert_allclose(usage.experts_per_row, usage.choices.sum(1))  # a softmax never gives exactly 0
            assert ((usage.effective_experts >= 1 - 1e-9) & (usage.effective_experts <= usage.choices.sum(1) + 1e-9)).all()


def test_gate_usage_read_in_the_scoring_pass_equals_its_own_pass():
    """train_run reads the gates in the validation pass that scores the model: the same summaries as a
    pass of their own, and the same outputs as a pass without recording (the fused path)."""
    from mtlkit.data import MultiTaskTensors
    from mtlkit.training import forward_outputs

    torch.manual_seed(0)
    model = build_model("ple", input_dim=7, tasks=["a", "b"], num_shared_experts=2, num_task_experts=1)
    x = torch.randn(300, 7)
    data = MultiTaskTensors(x, torch.randn(300, 2), ["a", "b"])
    usage = GateUsageAccumulator(model)
    with model.recording_gates():
        outputs = forward_outputs(model, data, model.tasks, 64, after_batch=usage.add_last_forward)
    assert all(bank.last_weights is None and not bank.record for bank in model.gate_banks().values())
    read, own = usage.result()[0], measure_gate_usage(model, [b.inputs for b in data.batches(50)])
    assert set(read) == set(own) == {"levels.0.gates", "levels.1.gates"}
    for path in own:
        assert read[path].rows == own[path].rows == 300
        for field in ("mean_weight", "top_share", "row_entropy", "experts_per_row"):
            np.testing.assert_allclose(getattr(read[path], field), getattr(own[path], field), rtol=1e-6, atol=1e-9)
    plain = forward_outputs(model, data, model.tasks, 64)
    for task in ("a", "b"):
        torch.testing.assert_close(outputs[task], plain[task], rtol=1e-5, atol=1e-6)


def test_names_say_which_task_and_which_experts():
    ple = build_model("ple", input_dim=4, tasks=["click", "buy"], num_shared_experts=2, num_task_experts=1, num_levels=2)
    usage = measure_gate_usage(ple, [torch.randn(20, 4)])
    first, last = usage["levels.0.gates"], usage["levels.1.gates"]
    assert first.gate_names == ["click", "buy", "shared"] and last.gate_names == ["click", "buy"]
    assert first.expert_names == ["click 0", "buy 0", "shared 0", "shared 1"]
    # A task's gate chooses its own expert and the shared ones; the shared gate all of them.
    assert first.choices.tolist() == [[True, False, True, True], [False, True, True, True], [True] * 4]
    assert measure_gate_usage(build_model("omoe", input_dim=4, tasks=["a", "b"]), [torch.randn(5, 4)])["gates"].gate_names == ["all tasks"]
    assert measure_gate_usage(build_model("shared_bottom", input_dim=4, tasks=["a", "b"]), [torch.randn(5, 4)]) == {}


def test_polarised_and_uniform_gates_are_told_apart():
    model = build_model("mmoe", input_dim=6, tasks=["a", "b"], num_experts=4)
    x = torch.randn(50, 6)
    with torch.no_grad():
        model.gates.linear.weight.zero_()
        model.gates.linear.bias.zero_()
    uniform = measure_gate_usage(model, [x])["gates"]
    np.testing.assert_allclose(uniform.effective_experts, [4, 4])
    np.testing.assert_allclose(uniform.row_entropy, [1, 1])
    np.testing.assert_allclose(uniform.overlap(), np.ones((2, 2)))
    with torch.no_grad():  # gate a always picks expert 0, gate b expert 2: experts 1 and 3 are dead
        model.gates.linear.bias.copy_(torch.tensor([[30.0, 0, 0, 0], [0, 0, 30.0, 0]]))
    polarised = measure_gate_usage(model, [x])["gates"]
    np.testing.assert_allclose(polarised.effective_experts, [1, 1], atol=1e-9)
    np.testing.assert_allclose(polarised.row_entropy, [0, 0], atol=1e-9)
    np.testing.assert_allclose(polarised.overlap(), np.eye(2), atol=1e-9)
    assert polarised.top_share[0, 0] == 1 and polarised.top_share[1, 2] == 1
    assert polarised.unused_experts() == ["expert 1", "expert 3"]


@pytest.fixture
def run_files(tmp_path):
    make_table(600, seed=0).to_csv(tmp_path / "train.csv", index=False)
    make_table(150, seed=1).drop(columns=["click", "buy", "watch_time"]).to_csv(tmp_path / "rows.csv", index=False)
    config = {"data": {"train": "train.csv", "valid_fraction": 0.2, "chunk_rows": 64},
              "schema": SCHEMA,
              "model": {"name": "ple", "num_shared_experts": 2, "num_task_experts": 1, "num_levels": 2,
                        "expert_hidden": [8], "tower_hidden": [4]},
              "training": {"max_epochs": 2, "batch_size": 64, "progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_a_run_folder_reports_its_gates_and_the_command_reads_them_on_any_table(run_files, monkeypatch):
    monkeypatch.chdir(run_files)
    run = train_run(load_run_config(run_files / "run.yaml"), run_files / "run", progress=False)
    written = json.loads((run / "gate_usage.json").read_text())
    assert written["rows"] == "valid" and set(written["gate_banks"]) == {"backbone.levels.0.gates", "backbone.levels.1.gates"}
    first = written["gate_banks"]["backbone.levels.0.gates"]
    assert first["gates"] == ["click", "buy", "watch", "shared"] and first["mean_weight"][0][1] is None  # click can't pick buy's expert
    assert (run / "gate_usage.png").stat().st_size > 0
    report = (run / "report.md").read_text()
    assert "## gates (validation rows)" in report and "| backbone.levels.1.gates | watch |" in report

    # Streamed in chunks of 64 rows, the same numbers as one pass over the whole table.
    usage = gate_usage_run(run, run_files / "rows.csv")
    loaded = load_run(run)
    encoded = loaded.preprocessor.transform(read_table(run_files / "rows.csv"), with_labels=False)
    direct = measure_gate_usage(loaded.model, [encoded.tensors.batches(1000).__next__().inputs])
    for path in direct:
        assert usage[path].rows == 150
        np.testing.assert_allclose(usage[path].mean_weight, direct[path].mean_weight, rtol=1e-6, atol=1e-9)

    done = run_cli("gates", str(run), "--data", str(run_files / "rows.csv"), "--out", str(run_files / "gates"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backbone.levels.0.gates" in done.stdout and "effective" in done.stdout
    assert json.loads((run_files / "gates" / "gate_usage.json").read_text())["rows"] == str(run_files / "rows.csv")


def test_gate_usage_by_the_values_of_a_column(run_files, monkeypatch):
    from mtlkit.experiments.tabular_run import gate_usage_by_column_run

    monkeypatch.chdir(run_files)
    run = train_run(load_run_config(run_files / "run.yaml"), run_files / "run", progress=False)
    table = read_table(run_files / "rows.csv")
    groups = gate_usage_by_column_run(run, run_files / "rows.csv", "city", max_groups=2)
    top = list(table["city"].value_counts().index[:2])
    assert list(groups) == [*top, "(other)"]
    assert sum(g["backbone.levels.1.gates"].rows for g in groups.values()) == 150
    loaded = load_run(run)
    for value, usage in groups.items():
        rows = table[table["city"].isin(top) == (value != "(other)")]
        rows = rows[rows["city"] == value] if value != "(other)" else rows
        encoded = loaded.preprocessor.transform(rows.reset_index(drop=True), with_labels=False)
        direct = measure_gate_usage(loaded.model, [next(encoded.tensors.batches(1000)).inputs])
        for path, expected in direct.items():
            assert usage[path].rows == len(rows)
            np.testing.assert_allclose(usage[path].mean_weight, expected.mean_weight, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(usage[path].row_entropy, expected.row_entropy, rtol=1e-6, atol=1e-9)
    done = run_cli("gates", str(run), "--data", str(run_files / "rows.csv"),
                   "--by", "city", "--max-groups", "2", "--out", str(run_files / "g"))
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads((run_files / "g" / "gate_usage_by_city.json").read_text())
    assert list(written["groups"]) == [*top, "(other)"]


def test_models_without_gates_say_so(run_files, monkeypatch):
    monkeypatch.chdir(run_files)
    config = load_run_config(run_files / "run.yaml", ["model={name: shared_bottom, bottom_hidden: [8], tower_hidden: [4]}"])
    run = train_run(config, run_files / "sb", progress=False)
    assert not (run / "gate_usage.json").exists() and "## gates" not in (run / "report.md").read_text()
    with pytest.raises(ConfigError, match="'shared_bottom' has no gates"):
        gate_usage_run(run, run_files / "rows.csv")
    done = run_cli("gates", str(run), "--data", str(run_files / "rows.csv"))
    assert done.returncode == 2 and "has no gates" in done.stdout


def test_the_gate_usage_example_runs():
    done = run_example("gate_usage_synthetic.py", "--seeds", "1", "--steps", "30", "--correlations", "0,1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "overlap" in done.stdout and "effective_experts" in done.stdout


@pytest.mark.parametrize("name", ["mmoe", "ple"])
def test_gate_dropout_ignores_experts_in_training_only(name):
    from mtlkit import ConfigError

    torch.manual_seed(0)
    model = build_model(name, input_dim=6, tasks=["a", "b"], gate_dropout=0.3)
    x = torch.randn(4000, 6)
    with model.recording_gates() as recorded:
        model.train()(x)
    for path, weights in recorded.items():
        allowed = torch.ones(weights.shape[1:], dtype=torch.bool)
        mask = model.gate_banks()[path].choice_mask
        if mask is not None:
            allowed = torch.isfinite(mask)
            assert (weights[:, ~allowed] == 0).all()  # PLE's excluded experts stay out
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
        dropped = (weights[:, allowed] == 0).double().mean().item()
        assert 0.25 < dropped < 0.32  # 0.3, less the rows that would have lost every expert
    assert model.takes_small_mixture_path(x)  # the one-node path drops them too (recording leaves it)
    model.eval()
    with model.recording_gates() as recorded:
        model(x)
    assert all((w[:, torch.isfinite(model.gate_banks()[p].choice_mask)] > 0).all() if model.gate_banks()[p].choice_mask is not None
               else (w > 0).all() for p, w in recorded.items())
    with pytest.raises(ConfigError, match="gate_dropout: expected a number in \\[0, 1\\)"):
        build_model(name, input_dim=6, tasks=["a", "b"], gate_dropout=1.0)


def test_a_gate_that_drops_everything_keeps_every_expert():
    model = build_model("mmoe", input_dim=4, tasks=["a"], num_experts=3, gate_dropout=0.999)
    with model.recording_gates() as recorded:
        model.train()(torch.randn(500, 4))
    weights = recorded["gates"]
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(500, 1))


@pytest.mark.parametrize("name", ["omoe", "mmoe", "cgc", "ple"])
def test_top_k_gates_mix_only_their_best_experts(name):
    torch.manual_seed(0)
    model = build_model(name, input_dim=6, tasks=["a", "b"], gate_top_k=2, **({"num_experts": 5} if "moe" in name else {}))
    dense = build_model(name, input_dim=6, tasks=["a", "b"], **({"num_experts": 5} if "moe" in name else {}))
    dense.load_state_dict(model.state_dict())
    x = torch.randn(300, 6)
    assert model.takes_small_mixture_path(x)  # top-k gates run on the one-node path too (recording leaves it)
    with model.recording_gates() as sparse, dense.recording_gates() as full:
        model(x), dense(x)
    for path, usage in measure_gate_usage(model, [x]).items():
        np.testing.assert_allclose(usage.experts_per_row, 2)
    for path, weights in sparse.items():
        assert ((weights > 0).sum(-1) == 2).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
        if path.startswith("levels.") and not path.startswith("levels.0."):
            continue  # a later PLE level reads the level below, which differs once it is sparse
        # The two kept are the dense gate's two largest, renormalised.
        best = full[path].topk(2, dim=-1)
        kept = weights.gather(-1, best.indices)
        torch.testing.assert_close(kept, best.values / best.values.sum(-1, keepdim=True))
    # A row's unchosen experts get no gradient through its gate.
    sum(o.sum() for o in model(x[:1]).values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("num_experts", [3, 8, 16, 20])  # counted ranks up to 16 experts, topk above
def test_keep_top_k_keeps_every_logit_at_or_above_the_kth_largest(num_experts):
    from mtlkit.models.gates import keep_top_k

    g = torch.Generator().manual_seed(num_experts)
    logits = torch.randint(-3, 4, (2, num_experts, 50), generator=g).float()  # many ties
    logits[0, 0, :10] = float("-inf")  # an excluded choice
    for k in range(1, num_experts + 1):
        kept = keep_top_k(logits, k)
        kth = logits.sort(dim=1, descending=True).values[:, k - 1: k]
        expected = logits.masked_fill(logits < kth, float("-inf"))
        assert torch.equal(kept, expected), k
        assert ((kept > float("-inf")).sum(1) >= torch.minimum(torch.tensor(k), torch.isfinite(logits).sum(1))).all()


def test_bad_gate_top_k():
    from mtlkit import ConfigError

    for value, name in ((0, "mmoe"), (9, "mmoe"), (2.5, "mmoe"), (True, "ple"), (12, "cgc")):
        with pytest.raises(ConfigError, match="gate_top_k"):
            build_model(name, input_dim=6, tasks=["a", "b"], gate_top_k=value)
    # A top_k of every expert is the dense gate, on the fused path.
    model = build_model("mmoe", input_dim=6, tasks=["a", "b"], gate_top_k=8)
    assert model.gates.top_k is None and model.takes_small_mixture_path(torch.randn(10, 6))
