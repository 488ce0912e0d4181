"""Dense building blocks: activations, a plain :class:`MLP`, and :class:`StackedLinear`.

``StackedLinear`` holds ``S`` independent linear maps as one weight tensor so that ``S`` experts,
gates or towers run as one matmul (shared input) or one batched matmul (one input per stack).
Everything else in ``mtlkit.models`` is assembled from these two.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from mtlkit.configuration import check_sizes
from mtlkit.errors import ConfigError
from mtlkit.models.fused_mlp import stacked_relu_mlp

__all__ = ["ACTIVATIONS", "NORMS", "MLP", "StackedLinear", "StackedMLP", "get_activation"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}
NORMS = (None, "batch", "layer")


def get_activation(name: str) -> nn.Module:
    """Instantiate an activation by name (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation: unknown {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Fully connected stack: ``(Linear -> [norm] -> activation -> [dropout]) x len(hidden_sizes)``.

    Args:
        input_dim: width of the input.
        hidden_sizes: width of each layer; the output width is ``hidden_sizes[-1]``.
        activation: name from ``ACTIVATIONS``.
        dropout: dropout probability after every activation.
        norm: ``None``, ``"batch"`` or ``"layer"``.

    Shape: ``(B, input_dim) -> (B, hidden_sizes[-1])`` (``(B, input_dim)`` when empty).

    Example::

        >>> MLP(100, (16,))(torch.zeros(4, 100)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        sizes = check_sizes(hidden_sizes, "hidden_sizes")
        if norm not in NORMS:
            raise ConfigError(f"norm: unknown {norm!r}; expected one of {list(NORMS)}")
        layers: list[nn.Module] = []
        width = input_dim
        for size in sizes:
            layers.append(nn.Linear(width, size))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(size))
            elif norm == "layer":
                layers.append(nn.LayerNorm(size))
            layers.append(get_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.layers = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class StackedLinear(nn.Module):
    """``num_stacks`` independent linear maps evaluated together.

    With ``shared_input=True`` the weights are stored as one ``[in, S * out]`` matrix, so all stacks
    are a single matmul of the common input; otherwise as ``[S, in, out]`` applied by one batched
    matmul to a per-stack input. Each stack is initialised like ``nn.Linear`` (uniform in
    ``+-1/sqrt(in)``) and independently, so experts differ from step 0.

    Shape: ``(B, in)`` (shared) or ``(B, S, in)`` (per stack) ``-> (B, S, out)``.
    """

    def __init__(self, num_stacks: int, in_features: int, out_features: int, shared_input: bool) -> None:
        super().__init__()
        self.num_stacks, self.in_features, self.out_features = num_stacks, in_features, out_features
        self.shared_input = shared_input
        shape = (in_features, num_stacks * out_features) if shared_input else (num_stacks, in_features, out_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(num_stacks, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def stack_weight(self, index: int) -> torch.Tensor:
        """The ``[in, out]`` weight of one stack (a view)."""
        if self.shared_input:
            return self.weight.view(self.in_features, self.num_stacks, self.out_features)[:, index]
        return self.weight[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:
            out = torch.addmm(self.bias.view(1, -1), x, self.weight)
            return out.view(x.shape[0], self.num_stacks, self.out_features)
        # [B, S, in] -> [S, B, in] so each stack is one GEMM of the batched matmul.
        return self.forward_stack_major(x.transpose(0, 1)).transpose(0, 1)

    def forward_stack_major(self, x: torch.Tensor) -> torch.Tensor:
        """Per-stack maps on a stack-major input, the batched matmul's own layout.

        Shape: ``(S, B, in)`` (any strides) ``-> (S, B, out)``, contiguous.
        """
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def forward_batch_last(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The same maps with the batch as the last dimension: ``(S, out, B)``, contiguous.

        Reductions over ``out`` (a gate's softmax over its few experts) then run along an outer
        dimension, vectorised over the batch, instead of over rows of a handful of floats.
        ``bias`` (``(S, out)``) replaces ``self.bias`` when given (a gate bank's masked bias).

        Shape: ``(B, in)`` (shared) or ``(B, S, in)`` (per stack) ``-> (S, out, B)``.
        """
        bias = self.bias if bias is None else bias
        if self.shared_input:
            out = torch.addmm(bias.view(-1, 1), self.weight.t(), x.t())
            return out.view(self.num_stacks, self.out_features, x.shape[0])
        return torch.baddbmm(bias.unsqueeze(2), self.weight.transpose(1, 2), x.permute(1, 2, 0))

    def extra_repr(self) -> str:
        return (
            f"num_stacks={self.num_stacks}, in_features={self.in_features}, "
            f"out_features={self.out_features}, shared_input={self.shared_input}"
        )


class _StackedNorm(nn.Module):
    """Batch or layer norm applied to each stack separately. Shape ``(B, S, D) -> (B, S, D)``."""

    def __init__(self, kind: str, num_stacks: int, width: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "batch":
            self.norm = nn.BatchNorm1d(num_stacks * width)
        else:
            self.weight = nn.Parameter(torch.ones(num_stacks, width))
            self.bias = nn.Parameter(torch.zeros(num_stacks, width))
        self.width = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "batch":
            return self.norm(h.reshape(h.shape[0], -1)).view_as(h)
        return F.layer_norm(h, (self.width,)) * self.weight + self.bias


class StackedMLP(nn.Module):
    """``num_stacks`` MLPs of identical shape computed as batched tensor ops.

    The first layer is one matmul when the input is shared (``x`` of shape ``(B, in)``); deeper layers
    are one batched matmul each. No Python loop over stacks.

    Args:
        num_stacks: number of independent MLPs (experts, towers, single-task networks).
        input_dim: input width.
        hidden_sizes: layer widths (activation after every layer unless ``activate_last=False``).
        shared_input: whether all stacks read the same ``(B, in)`` input, or each its own ``(B, S, in)``.
        activation, dropout, norm: as in :class:`MLP`.
        activate_last: apply norm/activation/dropout after the last layer (True for experts, False for
            output heads).

    Shape: ``(B, in)`` or ``(B, S, in)`` ``-> (B, S, hidden_sizes[-1])``.
    """

    def __init__(
        self,
        num_stacks: int,
        input_dim: int,
        hidden_sizes: Sequence[int],
        shared_input: bool = True,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
        activate_last: bool = True,
    ) -> None:
        super().__init__()
        sizes = check_sizes(hidden_sizes, "hidden_sizes")
        if not sizes:
            raise ConfigError("hidden_sizes: a stacked MLP needs at least one layer")
        if num_stacks < 1:
            raise ConfigError(f"num_stacks must be >= 1, got {num_stacks}")
        if norm not in NORMS:
            raise ConfigError(f"norm: unknown {norm!r}; expected one of {list(NORMS)}")
        self.num_stacks = num_stacks
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        width = input_dim
        for i, size in enumerate(sizes):
            self.linears.append(StackedLinear(num_stacks, width, size, shared_input=shared_input and i == 0))
            last = i == len(sizes) - 1
            self.norms.append(_StackedNorm(norm, num_stacks, size) if norm and (activate_last or not last) else nn.Identity())
            width = size
        # Not in place: on the strided per-expert views an in-place ReLU measured 10-20 % slower
        # (autograd has to rebase the views), see docs/performance-log.md.
        self.activation = get_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.activate_last = activate_last
        self.output_dim = width
        # ReLU stacks without norm or dropout take the fused path (one autograd node, in-place ReLU,
        # no layout copies) when their activations are large; everything else the module-by-module
        # one below.
        self.fused = activation == "relu" and norm is None and dropout == 0
        # Without norms (which read the batch-major layout) a chain of per-stack layers runs
        # stack-major, with one transpose in and one out instead of two per layer.
        self._stack_major = norm is None
        # No norm and no dropout: the activation alone, without two identity module calls per layer.
        self._activation_only = norm is None and dropout == 0
        # Activations per input row in the widest layer, all stacks together.
        self.max_activations_per_row = max(num_stacks * size for size in sizes)

    # The fused path saves memory traffic but runs its backward in Python: on the CPU it pays off from
    # about a million activations in a layer (W2's experts: 4.2 M, 18 % less time per step), and costs
    # 4-16 % on small stacks (W1's experts, 0.13 M; W2's towers, 0.26 M). On a GPU, whose memory is
    # fast and whose step is paced by kernel launches, autograd's modules were faster (an H200: W2
    # MMoE 2.45 against 3.07 ms per step, PLE 3.84 against 5.37). See docs/performance-log.md, round 13.
    FUSED_MIN_ACTIVATIONS = 1 << 20

    def takes_fused_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused ReLU stack (on the CPU, in fp32 or under bf16 autocast
        outside ``torch.compile``, ReLU, no norm, no dropout; large enough, or at any size when no
        gradient is recorded)."""
        # Without gradients the fused path is plain GEMMs with the bias added in the ReLU's pass, which
        # beats addmm's broadcast bias copy and an out-of-place ReLU at every size measured (inference,
        # round 19: W1 Shared-Bottom 121 -> 103 us a batch, W2 Shared-Bottom 2.46 -> 2.23 ms, W2 MMoE's
        # towers about 0.07 ms); the size threshold is about the fused backward's Python.
        if torch.is_autocast_enabled("cpu") and (torch.get_autocast_dtype("cpu") != torch.bfloat16 or torch.compiler.is_compiling()):
            return False  # autograd's modules, in the autocast dtype
        return (self.fused and x.device.type == "cpu"
                and (not torch.is_grad_enabled() or x.shape[0] * self.max_activations_per_row >= self.FUSED_MIN_ACTIVATIONS))

    def fused_forward(self, x: torch.Tensor, input_group_sizes: Sequence[int] | None = None) -> torch.Tensor:
        """The fused path, optionally with stacks reading runs of a grouped input (see ``stacked_relu_mlp``).

        Under bf16 autocast (``training.precision: bf16``) the input and parameters are cast once and the
        whole stack, forward and backward, runs in bf16 (autocast's own dtype for these matmuls), its
        parameters' gradients cast back to fp32 by autograd. W2 MMoE's model step on a Xeon with AMX:
        35.9 ms through autograd's modules under autocast, 26.7 ms this way, 46.0 ms in fp32
        (docs/performance-log.md, round 35).
        """
        weights, biases = [lin.weight for lin in self.linears], [lin.bias for lin in self.linears]
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weights, biases = x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases]
            with torch.autocast("cpu", enabled=False):  # already in bf16; nothing inside is to be cast again
                return stacked_relu_mlp(x, weights, biases, activate_last=self.activate_last, input_group_sizes=input_group_sizes)
        return stacked_relu_mlp(x, weights, biases, activate_last=self.activate_last, input_group_sizes=input_group_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, stack_major = self._run(x)
        return h.transpose(0, 1) if stack_major else h

    def forward_stack_major(self, x: torch.Tensor) -> torch.Tensor:
        """The same MLPs with the output stack-major, the layout their last batched matmul writes.

        Shape: ``(B, in)`` or ``(B, S, in)`` ``-> (S, B, hidden_sizes[-1])`` (any strides).
        """
        h, stack_major = self._run(x)
        return h if stack_major else h.transpose(0, 1)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The output, and whether it is stack-major ``(S, B, D)`` rather than ``(B, S, D)``."""
        if self.takes_fused_path(x):
            return self.fused_forward(x), False
        h = x
        last = len(self.linears) - 1
        stack_major = False
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            if self._stack_major and not linear.shared_input:
                if not stack_major:
                    h, stack_major = h.transpose(0, 1), True
                h = linear.forward_stack_major(h)
            else:
                h = linear(h)
            if i < last or self.activate_last:
                h = self.activation(h) if self._activation_only else self.dropout(self.activation(norm(h)))
        return h, stack_major

    @torch.no_grad()
    def load_from_mlps(self, mlps: Sequence[nn.Module]) -> None:
        """Copy the weights of ``num_stacks`` separate models made of ``nn.Linear`` layers (e.g. :class:`MLP`).

        Used to check that the batched form equals the loop it replaces.
        """
        if len(mlps) != self.num_stacks:
            raise ValueError(f"expected {self.num_stacks} modules, got {len(mlps)}")
        for s, mlp in enumerate(mlps):
            linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
            if len(linears) != len(self.linears):
                raise ValueError("layer counts differ")
            for stacked, linear in zip(self.linears, linears):
                stacked.stack_weight(s).copy_(linear.weight.T)
                stacked.bias[s].copy_(linear.bias)
