"""One adapter per library: build the workload's model the library's own way and time it.

Every adapter builds a measuring session: the model, its data and its trainer, warmed up, and one
window timer per kind of measurement, which times one window of steps when called and returns its
throughput (samples/s):
- ``trainer``: one epoch over the window's rows through the library's own trainer and data path
  (what a user gets; ``steps`` optimizer steps);
- ``model_alone``: forward + loss + backward + Adam step on one fixed batch (the model alone;
  mtlkit's is ``Trainer.train_step``, the step its ``fit`` takes);
- ``inference``: forward only, in inference mode.
``benchmarks.run`` asks the sessions of all libraries for their windows in turn, so the libraries
are timed seconds apart and the machine's drift falls on all of them alike.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import shutil
import tempfile
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.workloads import Workload, WorkloadData, torch_inputs

LIBRARIES = ("mtlkit", "torch_rechub", "deepctr_torch")
_DISPLAY_NAMES = {"omoe": "OMoE", "aitm": "AITM", "adatt": "AdaTT", "stem": "STEM"}  # the models a reference library lacks


def import_error(library: str) -> str | None:
    """Why ``library`` cannot be imported, or None when it can: a reference installed without one of
    its own imports (deepctr-torch needs ``requests`` and does not declare it) reads as skipped with
    the reason, not as absent."""
    if library == "mtlkit":
        return None
    try:
        __import__(library)
        return None
    except ImportError as error:
        return f"{type(error).__name__}: {error}"


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for the device's queued work before a clock is read (nothing on the CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


WindowTimer = Callable[[], float]
"""Times one window of steps when called: its throughput in samples/s."""

KINDS = ("trainer", "model_alone", "inference")


def window_timer(run_step: Callable[[], None], samples_per_step: int, steps: int, warmup: int,
                 device: str = "cpu", prepare: Callable[[], object] | None = None) -> WindowTimer:
    """Runs ``warmup`` steps now and returns the timer of a window of ``steps`` more; ``prepare``
    (a module's ``train()`` or ``eval()``, say) runs before each window's clock starts."""
    sync = synchronizer(device)
    if prepare is not None:
        prepare()
    for _ in range(warmup):
        run_step()

    def window() -> float:
        if prepare is not None:
            prepare()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        sync()
        return steps * samples_per_step / (time.perf_counter() - start)

    return window


def trainer_window(one_epoch: Callable[[], None], rows: int, device: str = "cpu") -> WindowTimer:
    """The timer of whole calls of a library's trainer, each one epoch over ``rows`` (one call now,
    as the warm-up): every library's trainer window, its per-fit work included."""
    return window_timer(one_epoch, rows, steps=1, warmup=1, device=device)


# --------------------------------------------------------------------------------------------- mtlkit
def build_mtlkit(workload: Workload, model_name: str, data: WorkloadData, **overrides):
    """mtlkit's model for the workload, its tasks and the data as :class:`MultiTaskTensors`;
    ``overrides`` replace or add model config fields (a gate type, say)."""
    from mtlkit import TaskSpec
    from mtlkit.data import MultiTaskTensors
    from mtlkit.features import EncoderConfig
    from mtlkit.models import build_model, build_tabular_model, esmm_tasks

    labels = torch.from_numpy(data.labels)
    if model_name == "esmm":
        tasks = esmm_tasks()
        cvr = torch.where(labels[:, 0] == 1, labels[:, 1], torch.full_like(labels[:, 1], float("nan")))
        labels = torch.stack([labels[:, 0], cvr, labels[:, 1]], 1)
    else:
        tasks = [TaskSpec(f"task{k}", workload.task_type) for k in range(2)]
    torch.manual_seed(0)
    if workload.vocab_sizes:
        num_dense = 0 if model_name == "esmm" else workload.num_dense
        encoder = EncoderConfig(num_dense=num_dense, categorical_cardinalities=workload.vocab_sizes,
                                categorical_embedding_dims=[workload.embedding_dim] * len(workload.vocab_sizes))
        model = build_tabular_model(model_name, encoder, tasks, {**workload.model_options(model_name), **overrides})
    else:
        model = build_model(model_name, input_dim=workload.num_dense, tasks=tasks, **{**workload.model_options(model_name), **overrides})
    dataset = MultiTaskTensors(torch_inputs(workload, data, model_name), labels, [t.name for t in tasks])
    return model, tasks, dataset


def trainer_rates(model: torch.nn.Module, dataset, batch: int, windows: int, steps: int, warmup: int, device: str = "cpu",
                  **options):
    """Samples/s of ``windows`` windows of ``steps`` optimizer steps each through mtlkit's own
    trainer, in one fit (timed by its step callback, the device synchronised at each mark), after
    ``warmup`` steps; ``options`` are further ``TrainerConfig`` fields (``compile``, ``precision``).
    Returns ``(trainer, rates)``."""
    from mtlkit.training import Trainer, TrainerConfig

    marks: list[float] = []
    total = warmup + windows * steps
    sync = synchronizer(device)

    def on_step(step: int) -> None:
        if step >= warmup and (step - warmup) % steps == 0:
            sync()
            marks.append(time.perf_counter())

    trainer = Trainer(model, TrainerConfig(batch_size=batch, max_steps=total, max_epochs=None, eval_every=total,
                                           patience=None, progress=False, device=device, **options))
    trainer.fit(dataset, step_callback=on_step)
    return trainer, [steps * batch / (b - a) for a, b in zip(marks, marks[1:])]


def mtlkit_session(workload: Workload, model_name: str, data: WorkloadData, steps: int, warmup: int,
                   compile_model: bool = False, device: str = "cpu") -> dict[str, WindowTimer]:
    from mtlkit.training import Trainer, TrainerConfig

    batch = workload.batch_size
    model, tasks, dataset = build_mtlkit(workload, model_name, data)
    # A trainer window is one fit of `steps` steps: one epoch over the window's rows.
    trainer = Trainer(model, TrainerConfig(batch_size=batch, max_steps=steps, max_epochs=None, eval_every=steps,
                                           patience=None, progress=False, device=device, compile=compile_model))
    if trainer.device.type != "cpu":  # moved there once, as one long fit would (each window's fit finds it there)
        dataset = dataset.to(trainer.device)
    fit = trainer_window(lambda: trainer.fit(dataset), steps * batch, device)

    # The model alone: the step fit takes (Trainer.train_step: forward, losses and weighting, compiled
    # or not, backward, the trainer's optimizer) on one fixed batch, no data path.
    fixed = dataset.subset(slice(0, batch)).to(trainer.device)
    fixed_batch = next(fixed.batches(batch))
    model_step = lambda: trainer.train_step(fixed_batch)  # noqa: E731

    def infer_step() -> None:
        with torch.inference_mode():
            model(fixed.inputs)

    return {"trainer": fit, "model_alone": window_timer(model_step, batch, steps, warmup, device, model.train),
            "inference": window_timer(infer_step, batch, steps, warmup, device, model.eval)}


# ------------------------------------------------------------------------------------------ references
def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _model_alone_and_inference(model: torch.nn.Module, fixed_x, fixed_y: torch.Tensor, loss_fn, batch: int,
                               steps: int, warmup: int, device: str = "cpu") -> dict[str, WindowTimer]:
    """A reference model's own step (forward, mean of the task losses, backward, Adam) and its inference."""
    model.to(device)
    fixed_x = fixed_x.to(device) if isinstance(fixed_x, torch.Tensor) else {k: v.to(device) for k, v in fixed_x.items()}
    fixed_y = fixed_y.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def model_step() -> None:
        out = model(fixed_x)
        loss = sum(loss_fn(out[:, k], fixed_y[:, k]) for k in range(fixed_y.shape[1])) / fixed_y.shape[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode():
            model(fixed_x)

    return {"model_alone": window_timer(model_step, batch, steps, warmup, device, model.train),
            "inference": window_timer(infer_step, batch, steps, warmup, device, model.eval)}


def rechub_session(workload: Workload, model_name: str, data: WorkloadData, steps: int, warmup: int,
                   device: str = "cpu") -> dict[str, WindowTimer]:
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import AITM, ESMM, MMOE, PLE, SharedBottom
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    if model_name in ("omoe", "adatt", "stem"):
        raise NotImplementedError(f"torch-rechub has no {_DISPLAY_NAMES[model_name]}")
    batch = workload.batch_size
    task_type = "regression" if workload.task_type == "regression" else "classification"
    sparse = [SparseFeature(f"c{i}", vocab_size=v, embed_dim=workload.embedding_dim) for i, v in enumerate(workload.vocab_sizes)]
    if workload.vocab_sizes:
        dense = [DenseFeature(f"d{j}") for j in range(workload.num_dense)]
        x = {f"d{j}": data.dense[:, j] for j in range(workload.num_dense)}
        x.update({f"c{i}": data.categorical[:, i] for i in range(len(workload.vocab_sizes))})
    else:
        dense = [DenseFeature("x", embed_dim=workload.num_dense)]
        x = {"x": data.dense}
    features = dense + sparse
    towers = [{"dims": list(workload.tower_hidden)}] * 2
    expert = {"dims": list(workload.expert_hidden)}
    torch.manual_seed(0)
    if model_name == "shared_bottom":
        model = SharedBottom(features, [task_type] * 2, bottom_params=expert, tower_params_list=towers)
    elif model_name == "mmoe":
        model = MMOE(features, [task_type] * 2, n_expert=workload.num_experts, expert_params=expert, tower_params_list=towers)
    elif model_name in ("cgc", "ple"):
        model = PLE(features, [task_type] * 2, n_level=1 if model_name == "cgc" else workload.num_levels,
                    n_expert_specific=workload.num_task_experts, n_expert_shared=workload.num_shared_experts,
                    expert_params=expert, tower_params_list=towers)
    elif model_name == "esmm":
        half = len(sparse) // 2
        model = ESMM(sparse[:half], sparse[half:], cvr_params=expert, ctr_params=expert)
        x = {f"c{i}": data.categorical[:, i] for i in range(len(workload.vocab_sizes))}
    elif model_name == "aitm":
        model = AITM(features, 2, bottom_params=expert, tower_params_list=towers)
    else:
        raise KeyError(model_name)
    y = data.labels
    rows = steps * batch
    x_window = {k: v[:rows] for k, v in x.items()}
    x_val = {k: v[:batch] for k, v in x.items()}
    loaders = DataGenerator(x_window, y[:rows]).generate_dataloader(x_val=x_val, y_val=y[:batch], x_test=x_val,
                                                                    y_test=y[:batch], batch_size=batch)
    # Its trainer saves the model into model_path: a folder removed when the measuring process exits.
    folder = tempfile.mkdtemp(prefix="rechub-bench-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    trainer = MTLTrainer(model, task_types=[task_type] * 2, optimizer_params={"lr": 1e-3, "weight_decay": 0.0},
                         n_epoch=1, earlystop_patience=10_000, device=device, model_path=folder)

    def one_epoch() -> None:
        with _quiet():
            trainer.fit(loaders[0], loaders[1])

    train = trainer_window(one_epoch, rows, device)
    fixed_x = {k: torch.as_tensor(v[:batch]) for k, v in x.items()}
    loss_fn = F.mse_loss if task_type == "regression" else F.binary_cross_entropy
    return {"trainer": train, **_model_alone_and_inference(model, fixed_x, torch.as_tensor(y[:batch]), loss_fn,
                                                           batch, steps, warmup, device)}


def deepctr_session(workload: Workload, model_name: str, data: WorkloadData, steps: int, warmup: int,
                    device: str = "cpu") -> dict[str, WindowTimer]:
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import ESMM, MMOE, PLE, SharedBottom

    if model_name in ("omoe", "aitm", "adatt", "stem"):
        raise NotImplementedError(f"deepctr-torch has no {_DISPLAY_NAMES[model_name]}")
    batch = workload.batch_size
    sparse = [SparseFeat(f"c{i}", vocabulary_size=v, embedding_dim=workload.embedding_dim) for i, v in enumerate(workload.vocab_sizes)]
    if workload.vocab_sizes:
        dense = [DenseFeat(f"d{j}", 1) for j in range(workload.num_dense)]
        x = {f"d{j}": data.dense[:, j] for j in range(workload.num_dense)}
        x.update({f"c{i}": data.categorical[:, i] for i in range(len(workload.vocab_sizes))})
    else:
        dense = [DenseFeat("x", workload.num_dense)]
        x = {"x": data.dense}
    columns = sparse + dense
    common = dict(task_types=(workload.task_type,) * 2, task_names=("task0", "task1"), l2_reg_linear=0.0,
                  l2_reg_embedding=0.0, tower_dnn_hidden_units=workload.tower_hidden, seed=0, device=device)
    if model_name == "shared_bottom":
        model = SharedBottom(columns, bottom_dnn_hidden_units=workload.expert_hidden, **common)
    elif model_name == "mmoe":
        model = MMOE(columns, num_experts=workload.num_experts, expert_dnn_hidden_units=workload.expert_hidden,
                     gate_dnn_hidden_units=(), **common)
    elif model_name in ("cgc", "ple"):
        model = PLE(columns, shared_expert_num=workload.num_shared_experts, specific_expert_num=workload.num_task_experts,
                    num_levels=1 if model_name == "cgc" else workload.num_levels,
                    expert_dnn_hidden_units=workload.expert_hidden, gate_dnn_hidden_units=(), **common)
    elif model_name == "esmm":
        common.pop("tower_dnn_hidden_units")
        model = ESMM(sparse, tower_dnn_hidden_units=workload.expert_hidden, **common)
        x = {f"c{i}": data.categorical[:, i] for i in range(len(workload.vocab_sizes))}
    else:
        raise KeyError(model_name)
    if model_name in ("cgc", "ple"):
        try:
            model.predict({k: v[:2] for k, v in x.items()}, batch_size=2)
        except IndexError as error:
            # deepctr-torch 0.3.0 indexes its shared experts by the task-specific count (the crash).
            raise RuntimeError(f"crashes with {workload.num_shared_experts} shared > {workload.num_task_experts} task experts "
                               f"(deepctr-torch's own bug: {error})") from error
    loss = "mse" if workload.task_type == "regression" else "binary_crossentropy"
    model.compile("adam", loss=[loss, loss])
    y = data.labels
    rows = steps * batch
    x_window = {k: v[:rows] for k, v in x.items()}

    def one_epoch() -> None:
        model.fit(x_window, y[:rows], batch_size=batch, epochs=1, verbose=0)

    train = trainer_window(one_epoch, rows, device)
    # deepctr models take one concatenated float tensor in feature-index order.
    fixed_x = torch.from_numpy(np.concatenate([np.asarray(x[name][:batch], dtype=np.float32).reshape(batch, -1)
                                               for name in model.feature_index], axis=1))
    loss_fn = F.mse_loss if workload.task_type == "regression" else F.binary_cross_entropy
    return {"trainer": train, **_model_alone_and_inference(model, fixed_x, torch.from_numpy(y[:batch]), loss_fn,
                                                           batch, steps, warmup, device)}


SESSIONS = {"mtlkit": mtlkit_session, "torch_rechub": rechub_session, "deepctr_torch": deepctr_session}
