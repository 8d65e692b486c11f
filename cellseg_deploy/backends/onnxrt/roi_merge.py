"""A cheaper ONNX form of torchvision's multi-scale RoIAlign merge, for the exporters.

``MultiScaleRoIAlign`` pools each RoI from one FPN level and puts the per-level results back in RoI order.
Eagerly it writes them into a preallocated tensor; when traced for ONNX, torchvision builds
(``torchvision.ops.poolers._onnx_merge_levels``) a zero ``[R, C, S, S]`` tensor and one ``ScatterElements``
per level with an index tensor expanded to the full ``[R_l, C, S, S]`` shape. On the CPU those scatters
(and, in OpenVINO, the expands and broadcasts around them) cost more than the RoIAlign itself; the profile is
in docs/cpu-fast-path.md ("Measurements behind the design").

:func:`gather_level_merge` swaps in an equivalent merge for the duration of an export: concatenate the
per-level results (levels in order), build the inverse permutation of the RoI indices with one small 1-D
scatter of ``R`` integers, and ``Gather`` the rows back into RoI order. Every output value is the same
RoIAlign value as before, only moved differently, so the exported graph's outputs are bit-identical
(checked in ``tests/fastpath``); eager PyTorch never takes this path.

Use::

    with gather_level_merge():
        torch.onnx.export(RawMaskRCNN(model), ...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def merge_levels_by_gather(levels: torch.Tensor, unmerged_results: list[torch.Tensor]) -> torch.Tensor:
    """Per-level RoIAlign outputs -> one tensor in RoI order (same values as torchvision's merge).

    Args:
        levels: int64 ``[R]``, the pyramid level index (0-based) of each RoI.
        unmerged_results: one float tensor ``[R_l, C, S, S]`` per level, rows in the order of
            ``torch.where(levels == l)``.

    Returns:
        ``[R, C, S, S]``: row ``i`` is RoI ``i``'s pooled features.
    """
    import torch

    order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged_results))])
    positions = torch.arange(order.shape[0], dtype=order.dtype, device=order.device)
    inverse = torch.zeros_like(order).scatter(0, order, positions)  # row of RoI i in the concatenation
    return torch.cat(unmerged_results)[inverse]


@contextlib.contextmanager
def gather_level_merge() -> Iterator[None]:
    """Within this block, traced ``MultiScaleRoIAlign`` merges levels with :func:`merge_levels_by_gather`.

    Restores torchvision's own function on exit, also on error. Not thread-safe (it swaps a module global),
    like tracing itself.
    """
    import torchvision.ops.poolers as poolers

    original = poolers._onnx_merge_levels
    poolers._onnx_merge_levels = merge_levels_by_gather
    try:
        yield
    finally:
        poolers._onnx_merge_levels = original
