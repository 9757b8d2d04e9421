"""Where whole tensors lie inside the flat partitions a ZeRO engine hands its optimizer.

The DeepSpeed engine derives a `FlatLayout` per partition from DeepSpeed's bookkeeping;
an optimizer that keeps per-tensor quantities exact under ZeRO (LAMB's trust ratio) reads
them through `set_flat_layouts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["FlatLayout"]


@dataclass(frozen=True)
class FlatLayout:
    """Where whole tensors lie inside one flat 1-D tensor a ZeRO engine hands the optimizer.

    ZeRO engines (DeepSpeed stages 1-3) concatenate a group of original tensors, split the
    result over the ranks of `group`, and give the optimizer only this rank's slice. Piece
    k of that slice is ``flat[starts[k] : starts[k] + lengths[k]]``; it holds elements
    ``offsets[k] : offsets[k] + lengths[k]`` of the flattened original tensor
    `tensor_ids[k]`. Elements covered by no piece are alignment padding: never read for a
    norm, never written. `numels` (and `names`, for messages and checkpoints) describe every
    original tensor of the group, in the same order on every rank, whether or not this rank
    holds a piece of it.
    """

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    tensor_ids: tuple[int, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    names: tuple[str, ...] = ()
    group: Any = None
    """Opaque handle (a process group) passed to the reduce function; None: one process."""
    _ids_by_device: dict = field(default_factory=dict, compare=False, repr=False)

    def ids_on(self, device: torch.device) -> Tensor:
        """`tensor_ids` as an int64 tensor on `device`, made once: a tensor made from host
        values at every step would be a copy to the device, which waits for it."""
        key = str(device)
        if key not in self._ids_by_device:
            self._ids_by_device[key] = torch.tensor(self.tensor_ids, device=device)
        return self._ids_by_device[key]

    @property
    def num_tensors(self) -> int:
        return len(self.numels)

    def pieces(self, flat: Tensor) -> list[Tensor]:
        return [flat.narrow(0, s, n) for s, n in zip(self.starts, self.lengths, strict=True)]

    def name(self, tensor_id: int) -> str:
        return self.names[tensor_id] if self.names else f"tensor {tensor_id}"

    def check(self, flat_numel: int) -> None:
        """Raise ValueError unless every piece lies inside the flat tensor and inside its
        original tensor, and no two pieces overlap."""
        fields = (self.starts, self.lengths, self.tensor_ids, self.offsets)
        if len({len(f) for f in fields}) != 1:
            raise ValueError("FlatLayout: starts, lengths, tensor_ids and offsets differ in length")
        if self.names and len(self.names) != self.num_tensors:
            raise ValueError(f"FlatLayout: {len(self.names)} names for {self.num_tensors} tensors")
        end = 0
        for start, n, tid, off in sorted(zip(*fields, strict=True)):
            if not 0 <= tid < self.num_tensors:
                raise ValueError(f"FlatLayout: tensor id {tid} outside 0..{self.num_tensors - 1}")
            what = f"FlatLayout: piece of {self.name(tid)} at flat[{start}:{start + n}]"
            if n <= 0 or start < end or start + n > flat_numel:
                raise ValueError(f"{what} is empty, overlaps another or exceeds {flat_numel}")
            if off < 0 or off + n > self.numels[tid]:
                raise ValueError(f"{what} exceeds the tensor's {self.numels[tid]} elements")
            end = start + n
