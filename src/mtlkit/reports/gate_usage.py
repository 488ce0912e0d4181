"""Expert utilisation: how the gates of a trained mixture of experts spread their weight.

These are the numbers the MMoE and PLE papers read their models by, and what a user needs to trust a
mixture: do the tasks share experts or keep their own, and has training fallen into one of the known
failure modes, a gate that sends every row to one expert (a polarised gate) or experts that no gate
uses (dead experts, parameters paid for and wasted)?
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from mtlkit.errors import DataError
from mtlkit.files import write_json
from mtlkit.models.base import MultiTaskModel
from mtlkit.reports.plots import plt, save_figure

__all__ = ["GateUsage", "GateUsageAccumulator", "measure_gate_usage", "measure_gate_usage_by_group", "gate_usage_markdown",
           "plot_gate_usage", "save_gate_usage"]


@dataclass
class GateUsage:
    """The weights of one gate bank (all gates of one level), summarised over a set of rows.

    Attributes:
        gate_names: ``(G,)`` the task each gate serves (``"shared"``: a PLE level's shared gate,
            ``"all tasks"``: OMoE's one gate).
        expert_names: ``(E,)`` the level's experts (PLE: ``"<task> i"`` task experts, ``"shared i"``).
        choices: ``(G, E)`` bool, whether gate ``g`` can choose expert ``e`` at all.
        mean_weight: ``(G, E)`` the gate's weight on each expert, averaged over rows; rows sum to 1.
        top_share: ``(G, E)`` the fraction of rows on which the expert has the gate's largest weight.
        row_entropy: ``(G,)`` the entropy of a row's weights over ``log(number of choices)``, averaged
            over rows: 0 when every row goes to a single expert, 1 when every row is spread evenly.
        experts_per_row: ``(G,)`` how many experts get a non-zero weight in a row, averaged over rows
            (every choice for a softmax gate; at most ``k`` for a top-k gate or a converged DSelect-k one).
        rows: how many rows were read.
    """

    gate_names: list[str]
    expert_names: list[str]
    choices: np.ndarray
    mean_weight: np.ndarray
    top_share: np.ndarray
    row_entropy: np.ndarray
    experts_per_row: np.ndarray
    rows: int

    @property
    def effective_experts(self) -> np.ndarray:
        """``(G,)`` ``exp(entropy of mean_weight)``: how many experts a gate uses across the rows, from 1
        (always the same one) to its number of choices (all of them equally)."""
        return np.exp(-np.sum(_xlogx(self.mean_weight), axis=1))

    def overlap(self) -> np.ndarray:
        """``(G, G)`` how much two gates draw on the same experts: ``sum_e min(w_g1[e], w_g2[e])`` of
        their mean weights, 1 for identical usage and 0 for disjoint experts."""
        w = self.mean_weight
        return np.minimum(w[:, None, :], w[None, :, :]).sum(axis=2)

    def unused_experts(self, threshold: float = 0.01) -> list[str]:
        """Experts that get less than ``threshold`` of the mean weight of every gate that can choose them."""
        used = (self.mean_weight >= threshold) & self.choices
        return [name for name, hit in zip(self.expert_names, used.any(axis=0)) if not hit]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for JSON; an expert a gate cannot choose has weight NaN (``write_json``: null)."""
        return {
            "rows": self.rows, "gates": self.gate_names, "experts": self.expert_names,
            "mean_weight": _rounded(np.where(self.choices, self.mean_weight, np.nan)),
            "top_share": _rounded(np.where(self.choices, self.top_share, np.nan)),
            "row_entropy": _rounded(self.row_entropy), "experts_per_row": _rounded(self.experts_per_row),
            "effective_experts": _rounded(self.effective_experts),
            "choices": self.choices.sum(axis=1).tolist(), "overlap": _rounded(self.overlap()),
            "unused_experts": self.unused_experts(),
        }


def _xlogx(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _rounded(values: np.ndarray) -> list:
    return np.round(values.astype(float), 6).tolist()


def measure_gate_usage(model: MultiTaskModel, batches: Iterable[Any]) -> dict[str, GateUsage]:
    """Run ``model`` (in eval mode) over ``batches`` of its inputs and summarise every gate bank.

    Returns ``{gate bank path: GateUsage}`` (e.g. ``"backbone.gates"``, ``"backbone.levels.1.gates"``);
    empty for models without gates (Shared-Bottom, ESMM, ...).
    """
    return measure_gate_usage_by_group(model, ((inputs, None) for inputs in batches), 1)[0]


@torch.no_grad()
def measure_gate_usage_by_group(model: MultiTaskModel, batches: Iterable[tuple[Any, torch.Tensor | None]],
                                num_groups: int) -> list[dict[str, GateUsage]]:
    """:func:`measure_gate_usage` for each group of rows (user segments, clicked or not, ...).

    ``batches`` yields ``(inputs, group)`` with ``group`` ``(B,)`` integers in ``[0, num_groups)`` (None:
    every row in group 0). Returns one ``{gate bank path: GateUsage}`` per group; a group without rows
    is a :class:`DataError`.
    """
    usage = GateUsageAccumulator(model, num_groups)
    if not usage.banks:
        return [{} for _ in range(num_groups)]
    was_training = model.training
    model.eval()
    try:
        for inputs, group in batches:
            with model.recording_gates() as recorded:
                model(inputs)
            usage.add(recorded, group)
    finally:
        model.train(was_training)
    return usage.result()


class GateUsageAccumulator:
    """Sums of a model's gate weights over batches, by group of rows, summarised by :meth:`result`.

    Fed either the dict :meth:`MultiTaskModel.recording_gates` yields (:meth:`add`) or, inside that
    context, after each forward of another pass over the rows (:meth:`add_last_forward`: the
    validation pass that also scores the model, so the gates cost no pass of their own).
    """

    def __init__(self, model: MultiTaskModel, num_groups: int = 1) -> None:
        self.banks = model.gate_banks()
        self.num_groups = num_groups
        self.weight_sums: dict[str, torch.Tensor] = {}
        self.top_counts: dict[str, torch.Tensor] = {}
        self.entropy_sums: dict[str, torch.Tensor] = {}
        self.nonzero_sums: dict[str, torch.Tensor] = {}
        self.rows = torch.zeros(num_groups, dtype=torch.float64)

    def add_last_forward(self, group: torch.Tensor | None = None) -> None:
        """:meth:`add` the weights the gates kept from the last forward (while recording)."""
        self.add({path: bank.last_weights for path, bank in self.banks.items() if bank.last_weights is not None}, group)

    @torch.no_grad()
    def add(self, recorded: Mapping[str, torch.Tensor], group: torch.Tensor | None = None) -> None:
        """Add one batch: ``{gate bank path: weights (B, G, E)}`` and its rows' groups ``(B,)`` (None: group 0)."""
        for path, weights in recorded.items():
            w = weights.double()
            g = torch.zeros(len(w), dtype=torch.long, device=w.device) if group is None else group.to(w.device)
            if path not in self.weight_sums:
                self.weight_sums[path] = w.new_zeros((self.num_groups, *w.shape[1:]))
                self.top_counts[path] = w.new_zeros((self.num_groups, *w.shape[1:]))
                self.entropy_sums[path] = w.new_zeros((self.num_groups, w.shape[1]))
                self.nonzero_sums[path] = w.new_zeros((self.num_groups, w.shape[1]))
            self.weight_sums[path].index_add_(0, g, w)
            self.top_counts[path].index_add_(0, g, torch.nn.functional.one_hot(w.argmax(-1), w.shape[-1]).double())
            self.entropy_sums[path].index_add_(0, g, -torch.special.xlogy(w, w).sum(2))
            self.nonzero_sums[path].index_add_(0, g, (w > 0).sum(2).double())
        if recorded:
            size = len(next(iter(recorded.values())))
            self.rows += torch.bincount(torch.zeros(size, dtype=torch.long) if group is None else group.cpu().long(),
                                        minlength=self.num_groups).double()

    def result(self) -> list[dict[str, GateUsage]]:
        """One ``{gate bank path: GateUsage}`` per group (empty for a model without gates); a group
        without rows is a :class:`DataError`."""
        if not self.banks:
            return [{} for _ in range(self.num_groups)]
        rows = self.rows
        if bool((rows == 0).any()):
            raise DataError("no rows to read the gate weights from" + (
                f" in group(s) {torch.nonzero(rows == 0).flatten().tolist()}" if self.num_groups > 1 else ""))
        choices = {}
        for path, bank in self.banks.items():
            allowed = np.ones((len(bank.gate_names), len(bank.choice_names)), dtype=bool)
            choices[path] = allowed if bank.choice_mask is None else ~torch.isinf(bank.choice_mask).cpu().numpy()
        # A gate with one choice has nothing to spread; its entropy is 0, not 0/0.
        scales = {path: np.log(np.maximum(allowed.sum(axis=1), 2)) for path, allowed in choices.items()}
        result = []
        for k in range(self.num_groups):
            n = rows[k].item()
            result.append({path: GateUsage(
                gate_names=list(bank.gate_names), expert_names=list(bank.choice_names), choices=choices[path],
                mean_weight=(self.weight_sums[path][k] / n).cpu().numpy(),
                top_share=(self.top_counts[path][k] / n).cpu().numpy(),
                row_entropy=(self.entropy_sums[path][k] / n).cpu().numpy() / scales[path],
                experts_per_row=(self.nonzero_sums[path][k] / n).cpu().numpy(), rows=int(n)) for path, bank in self.banks.items()})
        return result


def gate_usage_markdown(usages: Mapping[str, GateUsage]) -> str:
    """A report section: for every gate, how many experts it uses, how sharply, and its heaviest expert."""
    lines = ["| gates | gate | effective experts (of choices) | row entropy | experts per row | heaviest expert (mean weight) |",
             "|---|---|---|---|---|---|"]
    for path, usage in usages.items():
        for g, gate in enumerate(usage.gate_names):
            top = int(np.argmax(usage.mean_weight[g]))
            lines.append(f"| {path} | {gate} | {usage.effective_experts[g]:.2f} of {int(usage.choices[g].sum())} | "
                         f"{usage.row_entropy[g]:.2f} | {usage.experts_per_row[g]:.2f} | "
                         f"{usage.expert_names[top]} ({usage.mean_weight[g, top]:.2f}) |")
    pairs = []
    for path, usage in usages.items():
        overlap = usage.overlap()
        pairs += [f"{path}: {a}/{b} {overlap[i, j]:.2f}" for i, a in enumerate(usage.gate_names)
                  for j, b in enumerate(usage.gate_names) if i < j]
    if pairs:
        lines += ["", "Overlap of two gates' mean weights (1: the same experts in the same proportions, 0: none in "
                  "common): " + "; ".join(pairs) + "."]
    unused = {path: u.unused_experts() for path, u in usages.items() if u.unused_experts()}
    lines += ["", "Experts below 1% of every gate that can choose them: "
              + ("; ".join(f"{path}: {', '.join(names)}" for path, names in unused.items()) if unused else "none") + "."]
    return "\n".join(lines)


def plot_gate_usage(usages: Mapping[str, GateUsage], path: str | os.PathLike, title: str = "gate weights") -> Path:
    """Heat maps of the mean gate weights, one panel per gate bank (gates x experts); experts a gate
    cannot choose are left blank."""
    panels = list(usages.items())
    width = max(len(u.expert_names) for _, u in panels)
    figure, axes = plt.subplots(len(panels), 1, squeeze=False,
                                figsize=(max(5.0, 0.7 * width + 2.5), sum(0.45 * len(u.gate_names) + 1.3 for _, u in panels)))
    for ax, (name, usage) in zip(axes[:, 0], panels):
        shown = np.ma.masked_where(~usage.choices, usage.mean_weight)
        image = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(usage.expert_names)), usage.expert_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(usage.gate_names)), usage.gate_names, fontsize=8)
        ax.set_title(name, fontsize=9)
        for (g, e), value in np.ndenumerate(usage.mean_weight):
            if usage.choices[g, e]:
                ax.text(e, g, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
        figure.colorbar(image, ax=ax, fraction=0.03)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def save_gate_usage(usages: Mapping[str, GateUsage], folder: str | os.PathLike, title: str, **about: Any) -> list[Path]:
    """Write ``gate_usage.json`` (every summary, plus ``about``: which rows were read) and
    ``gate_usage.png`` into ``folder``; returns their paths."""
    folder = Path(folder)
    data = {**about, "gate_banks": {path: usage.to_dict() for path, usage in usages.items()}}
    return [write_json(folder / "gate_usage.json", data), plot_gate_usage(usages, folder / "gate_usage.png", title)]
