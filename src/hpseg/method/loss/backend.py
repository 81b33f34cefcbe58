"""Which implementation computes the HP loss: ``LossBackend``, held by each ``HiddenPositiveLoss``.

A backend carries what it learns while it runs (the Triton kernels failed, the compiled dense
functions): that state belongs to the loss object that owns it, never to the process.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from hpseg.errors import InvalidInputError
from hpseg.method.loss.dense import DenseFunctions
from hpseg.method.loss.terms import LossSettings
from hpseg.method.loss.torch_path import torch_loss_and_gradients
from hpseg.method.positives import PositiveInputs, SharedContrastPattern

#: The backends a run can name (``method.loss_backend``).
NAMES = ("auto", "triton", "torch", "torch-dense", "torch-sparse")
# Tiles of the torch path with at most this share of pairs needing a logit go through the sparse
# path on the CPU, where sparse sampled products win up to about 15 % (BENCHMARKS.md). On a GPU every
# tile is dense: there the small sparse launches cost more than the dense products they save
# (measured on an H200: 2.4-5x slower at batch 16-64, BENCHMARKS.md).
CPU_SPARSE_DENSITY_LIMIT = 0.15
# Rows of one block of G per embedding in the Triton path. Measured on an H200: blocks of 1280 rows
# are 2 x 128 MiB at batch 64 (N = 50,176) and give the products G @ e their full speed there
# (256-row blocks: 0.113 -> 0.126 s per loss); sized by entries instead (2^26, 5,248 rows at batch
# 16), G was most of the loss's memory at batch 16 (0.34 GiB in all against 0.15 GiB).
PAIR_GRADIENT_ROWS = 1280


@dataclass(eq=False)
class LossBackend:
    """How the HP loss computes its pair work; all compute the same loss.

    name:
        ``"auto"``: the fused Triton kernels on CUDA under half-precision products with a
        ``SharedContrastPattern`` (and on CPU tensors under Triton's interpreter,
        ``TRITON_INTERPRET=1``, for tests); elsewhere the torch path with the device's tile choice.
        If the kernels fail (a compiler or driver error) it warns and this backend uses the torch
        path from then on.
        ``"triton"``: the kernels, or an error where they cannot run (float32 on CUDA stays with
        cuBLAS under ``auto``: Triton's exact float32 products are slower).
        ``"torch"``: the torch path: on the CPU, tiles up to ``CPU_SPARSE_DENSITY_LIMIT`` of pairs
        sparse, the others dense; on a GPU every tile dense.
        ``"torch-dense"`` / ``"torch-sparse"``: the torch path with every tile dense / every tile
        that has a pair sparse.
    compile: the torch path's dense elementwise work compiled by ``torch.compile`` on CUDA
        (False: eager, for benchmarks).
    pair_gradient_rows: rows of one block of the pair gradient in the Triton path.
    """

    name: str = "auto"
    compile: bool = True
    pair_gradient_rows: int = PAIR_GRADIENT_ROWS
    triton_failed: bool = field(default=False, init=False)  # "auto" only: the kernels failed once
    dense_functions: DenseFunctions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise InvalidInputError(f"unknown loss backend {self.name!r}; known: {', '.join(NAMES)}")
        self.dense_functions = DenseFunctions(self.compile)

    def sparse_density_limit(self, device: torch.device) -> float:
        """The tile density at or under which the torch path uses the sparse path on ``device``
        (negative: every tile dense; above 1: every tile with a pair sparse)."""
        if self.name == "torch-dense":
            return -1.0
        if self.name == "torch-sparse":
            return 2.0
        return CPU_SPARSE_DENSITY_LIMIT if device.type == "cpu" else -1.0

    def uses_triton(self, inputs: PositiveInputs, matmul_dtype: torch.dtype) -> bool:
        """Whether the call with these inputs goes through the Triton kernels."""
        if self.name == "triton":
            reason = _why_not_triton(inputs, matmul_dtype)
            if reason:
                raise InvalidInputError(f"loss backend 'triton': {reason}")
            return True
        return self.name == "auto" and not self.triton_failed and not _why_not_triton(inputs, matmul_dtype)

    def loss_and_gradients(
        self, embeddings: list[torch.Tensor], want_grads: list[bool], inputs: PositiveInputs, settings: LossSettings
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The loss -sum_i c_i (n_i(z) + n_i(z_mix)) and the gradients wanted (others None)."""
        if self.uses_triton(inputs, settings.matmul_dtype):
            try:
                return _triton_path().triton_loss_and_gradients(
                    embeddings, want_grads, inputs, settings, self.pair_gradient_rows
                )
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - a compiler or driver failure: the torch path is exact
                if self.name == "triton":
                    raise
                self.triton_failed = True
                warnings.warn(f"HP loss: the Triton kernels failed ({error!r}); using the torch path from now on", stacklevel=2)
        device = embeddings[0].device
        return torch_loss_and_gradients(
            embeddings, want_grads, inputs, settings, self.sparse_density_limit(device), self.dense_functions
        )


def _triton_path():
    # Imported on first use, not with this module: importing Triton takes about 70 MB and a second,
    # which a CPU run would spend for nothing.
    from hpseg.method.loss import triton_path

    return triton_path


def _why_not_triton(inputs: PositiveInputs, matmul_dtype: torch.dtype) -> str:
    """Why the kernels cannot run on these inputs ("" if they can)."""
    if not isinstance(inputs.contrast_draw, SharedContrastPattern):
        # An independent draw comes from torch's generator, which a kernel cannot replay.
        return "an independent contrast draw needs the torch path"
    device = inputs.task_agnostic.device.type
    on_cuda = device == "cuda" and matmul_dtype in (torch.float16, torch.bfloat16)
    # Tests: Triton's interpreter runs the kernels on CPU tensors (it has no bfloat16).
    interpreted = (
        device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and matmul_dtype in (torch.float32, torch.float16)
    )
    if not (on_cuda or interpreted):
        return f"the kernels run on CUDA under float16 / bfloat16 products, not {device} with {matmul_dtype}"
    if not _triton_path().AVAILABLE:
        return "Triton is not installed"
    return ""
