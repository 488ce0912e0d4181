"""The benchmark workloads (issue 4), defined once for every library.

W1 "paper-synthetic": 100 dense inputs, 2 regression tasks, batch 1024, 8 experts Linear(100, 16)+ReLU,
linear softmax gates, towers [8] + Linear(8, 1); CGC/PLE with 4 shared + 2 task experts, PLE 2 levels.
W2 "census-like recsys": 7 dense + 33 categorical features (vocabularies 3..60), embedding dim 8
(input width 271), 2 binary tasks, 8 experts MLP [256, 128], towers [64] + Linear(64, 1), batch 2048.
Shared-Bottom's bottom is one expert's MLP. ESMM (W2 only) reads the 33 categorical features, with
CTR and CVR towers of the expert MLP's sizes. AITM (W2 only; not among the issue's targets) gives each
task a network of the expert MLP's sizes and the towers [64] + Linear(64, 1), without the calibrator,
which the reference implementation lacks. AdaTT (not among the issue's targets, and in neither
reference library) has PLE's experts and levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

MODELS = ("shared_bottom", "omoe", "mmoe", "cgc", "ple", "adatt", "stem", "esmm", "aitm")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    batch_size: int
    num_dense: int
    vocab_sizes: tuple[int, ...]
    embedding_dim: int
    task_type: str  # "regression" or "binary"
    expert_hidden: tuple[int, ...]
    tower_hidden: tuple[int, ...]
    rows: int
    num_experts: int = 8
    num_shared_experts: int = 4
    num_task_experts: int = 2
    num_levels: int = 2
    models: tuple[str, ...] = field(default=MODELS)

    @property
    def input_dim(self) -> int:
        return self.num_dense + len(self.vocab_sizes) * self.embedding_dim

    def model_options(self, model: str) -> dict:
        """mtlkit config fields of ``model`` on this workload."""
        common = {"tower_hidden": self.tower_hidden}
        if model == "shared_bottom":
            return {**common, "bottom_hidden": self.expert_hidden}
        if model in ("omoe", "mmoe"):
            return {**common, "num_experts": self.num_experts, "expert_hidden": self.expert_hidden}
        if model == "cgc":
            return {**common, "num_shared_experts": self.num_shared_experts, "num_task_experts": self.num_task_experts,
                    "expert_hidden": self.expert_hidden}
        if model in ("ple", "adatt"):
            return {**self.model_options("cgc"), "num_levels": self.num_levels}
        if model == "stem":  # CGC's experts, each task's on its own embedding copy (as in configs/census.yaml)
            return {**self.model_options("cgc"), "num_levels": 1}
        if model == "esmm":
            return {"tower_hidden": self.expert_hidden}
        if model == "aitm":
            return {**common, "bottom_hidden": self.expert_hidden, "calibration_weight": 0.0}
        raise KeyError(model)


def _w2_vocab_sizes() -> tuple[int, ...]:
    sizes = np.random.default_rng(2).integers(3, 61, size=33)
    sizes[0], sizes[1] = 3, 60  # the stated range's ends
    return tuple(int(s) for s in sizes)


WORKLOADS = {
    "W1": Workload("W1", "paper-synthetic", batch_size=1024, num_dense=100, vocab_sizes=(), embedding_dim=0,
                   task_type="regression", expert_hidden=(16,), tower_hidden=(8,), rows=200_000,
                   models=("shared_bottom", "omoe", "mmoe", "cgc", "ple", "adatt")),
    "W2": Workload("W2", "census-like recsys", batch_size=2048, num_dense=7, vocab_sizes=_w2_vocab_sizes(), embedding_dim=8,
                   task_type="binary", expert_hidden=(256, 128), tower_hidden=(64,), rows=200_000),
}


@dataclass
class WorkloadData:
    """Columns as numpy arrays (what every library starts from) plus labels ``(N, 2)``."""

    dense: np.ndarray        # (N, num_dense) float32
    categorical: np.ndarray  # (N, num_categorical) int64
    labels: np.ndarray       # (N, 2) float32


def make_data(workload: Workload, rows: int | None = None, seed: int = 0) -> WorkloadData:
    rows = rows or workload.rows
    rng = np.random.default_rng(seed)
    # Drawn as float32: a float64 draw cast afterwards held 3x the block at once, and for W1's
    # Shared-Bottom (666,000 rows) that transient set every library's peak RSS alike.
    dense = rng.standard_normal((rows, workload.num_dense), dtype=np.float32)
    categorical = np.stack([rng.integers(0, v, rows) for v in workload.vocab_sizes], 1) if workload.vocab_sizes \
        else np.zeros((rows, 0), dtype=np.int64)
    signal = dense[:, :2].sum(1) + (categorical[:, 0] if categorical.shape[1] else 0)
    if workload.task_type == "binary":
        click = (signal + rng.standard_normal(rows) > 0.5).astype(np.float32)
        conversion = click * (rng.random(rows) < 0.3)
        labels = np.stack([click, conversion], 1).astype(np.float32)
    else:
        labels = np.stack([signal + rng.standard_normal(rows) * 0.1, signal * 0.5 + rng.standard_normal(rows)], 1).astype(np.float32)
    return WorkloadData(dense, categorical.astype(np.int64), labels)


def torch_inputs(workload: Workload, data: WorkloadData, model: str) -> dict[str, torch.Tensor] | torch.Tensor:
    """mtlkit's packed input: one float block and one int block (ESMM reads only the categorical one)."""
    if not workload.vocab_sizes:
        return torch.from_numpy(data.dense)
    inputs = {"categorical": torch.from_numpy(data.categorical)}
    if model != "esmm":
        inputs["dense"] = torch.from_numpy(data.dense)
    return inputs
