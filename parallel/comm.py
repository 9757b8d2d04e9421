"""Communication accounting: the bytes each collective moves, by kind and mesh axis.

`CommCounter` is a TorchDispatchMode: while it is active on a thread, every collective
that reaches the dispatcher is recorded as (kind, axis) -> payload bytes and calls. It
sees both paths by which Loom communicates:
  * the c10d ops (`torch.ops.c10d.*`) behind `torch.distributed.*`: DDP's reducer (C++,
    which calls them through the dispatcher from the autograd hooks), FSDP2's all-gathers
    and reduce-scatters, ReplicaSync, pipeline sends and receives, the trainer's sums;
  * the functional collectives (`torch.ops._c10d_functional.*`) that DTensor (tensor and
    sequence parallelism, loss parallelism, norms of sharded tensors) and expert
    parallelism's all-to-all issue. A DTensor op is let through to DTensor first
    (NotImplemented), so its collectives come back here as plain functional ops; the c10d
    op that a functional op runs inside is not seen again (the mode is off while it runs).
Dispatch modes are thread-local. On CPU the autograd engine runs backward, with DDP's and
FSDP2's hooks, on the calling thread; on CUDA it runs them on a device thread, which
torch hands the caller's thread-local state, dispatch modes included (Loom's tests check
the CPU path only). What never reaches the
dispatcher is not counted: NCCL traffic inside a fused kernel or a custom extension
(DeepSpeed's own CUDA all-gathers, for instance) and object collectives' pickling.

"Bytes" is the payload this rank hands the collective (numel x element size of the
tensor argument), not what crosses the wire:
    all_reduce      the tensor reduced (input = output);
    reduce_scatter  the whole input (this rank keeps 1/n of it);
    all_gather      the local input shard (the output is n times larger);
    broadcast       the tensor, on the root and on the receivers alike;
    all_to_all      the whole local input (including the rows that stay here);
    send / recv     the tensor sent / received into.
A ring moves about 2 (n-1)/n x bytes per rank for an all-reduce, (n-1)/n x bytes for a
reduce-scatter, (n-1) x bytes for an all-gather (`wire_bytes`).

Axis: the mesh axis whose process group ran the collective: pp, dp_replicate, dp_shard,
ep, tp, or a flattened one: dp (= dp_replicate x dp_shard x ep: DDP's and ReplicaSync's
gradients, the trainer's loss and token sums), fsdp (dp_shard x ep: FSDP2's dense
parameters) or edp (dp_replicate x dp_shard: expert weights); "world" for the default
group, "other" for any other. Groups are told apart by the ranks they span, and an axis
is named after the first of that list spanning the same ranks (`axis_label`): with data
parallelism alone, DDP's "dp" group is the dp_replicate axis, and so is "world".

Control: a collective of at most `CONTROL_NUMEL` elements (loss sums, token counts,
gradient-norm pieces, LAMB's full-tensor norms, finiteness and stop flags) is tallied
apart, under kind "control", so that the data volumes compare with a formula that does
not model each scalar (parallel/comm_model.py).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.dist import FLAT_AXES, MESH_AXES

__all__ = [
    "CONTROL_NUMEL",
    "KINDS",
    "CommCounter",
    "CommTally",
    "AXIS_SPANS",
    "AxisNames",
    "axis_label",
    "axis_size",
    "format_bytes",
    "summary_lines",
    "wire_bytes",
]

CONTROL_NUMEL = 64
"""A collective of at most this many elements is control traffic, not data."""

KINDS = (
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "all_to_all",
    "send",
    "recv",
    "reduce",
    "gather",
    "scatter",
)

Key = tuple[str, str]  # (kind, axis)


@dataclass
class CommTally:
    """Payload bytes and calls by (kind, axis); kind "control" holds the small collectives.
    Means over ranks may hold fractional calls."""

    bytes: dict[Key, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[Key, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, kind: str, axis: str, numel: int, nbytes: float, calls: float = 1) -> None:
        if numel <= CONTROL_NUMEL:
            kind = "control"
        self.bytes[(kind, axis)] += nbytes
        self.calls[(kind, axis)] += calls

    def data(self) -> dict[Key, float]:
        """The bytes of every (kind, axis) but control."""
        return {k: v for k, v in self.bytes.items() if k[0] != "control"}

    def to_json(self) -> dict[str, dict[str, dict[str, float]]]:
        """{kind: {axis: {"bytes": b, "calls": n}}}, sorted."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for kind, axis in sorted(self.bytes):
            entry = {"bytes": self.bytes[(kind, axis)], "calls": self.calls[(kind, axis)]}
            out.setdefault(kind, {})[axis] = entry
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> CommTally:
        tally = cls()
        for kind, axes in data.items():
            for axis, entry in axes.items():
                tally.bytes[(kind, axis)] += entry["bytes"]
                tally.calls[(kind, axis)] += entry["calls"]
        return tally

    @staticmethod
    def mean(tallies: Iterable[CommTally]) -> CommTally:
        """The per-rank mean of several ranks' tallies."""
        tallies = list(tallies)
        out = CommTally()
        for t in tallies:
            for key, value in t.bytes.items():
                out.bytes[key] += value / len(tallies)
                out.calls[key] += t.calls[key] / len(tallies)
        return out


# Base axes each axis spans: an axis is named after the first one here spanning the same
# ranks, so a group shared by two axes (torch reuses the default group for any axis that
# spans the world) has one name on every rank and in the formula.
AXIS_SPANS: dict[str, tuple[str, ...]] = {
    **{axis: (axis,) for axis in MESH_AXES},
    "dp": ("dp_replicate", "dp_shard", "ep"),
    "fsdp": ("dp_shard", "ep"),
    "edp": ("dp_replicate", "dp_shard"),
    "world": MESH_AXES,
}
assert tuple(AXIS_SPANS)[len(MESH_AXES) : -1] == FLAT_AXES


def axis_label(axis: str, shape: Mapping[str, int]) -> str:
    """The name under which collectives on `axis` are counted for a mesh of `shape`
    ({base axis: degree}): the first axis of AXIS_SPANS spanning the same ranks (those of
    its base axes of degree > 1). E.g. with dp_replicate alone > 1, "dp" and "world" are
    counted as "dp_replicate"."""
    spans = {name: {a for a in bases if shape.get(a, 1) > 1} for name, bases in AXIS_SPANS.items()}
    return next(name for name, bases in spans.items() if bases == spans[axis])


class AxisNames:
    """Process group (name, or the group itself) -> axis label, by the ranks it spans:
    those of an axis of `mesh` (Loom's, parallel.dist) or of the default group ("world"),
    named as `axis_label` names them; any other group is "other"."""

    def __init__(self, mesh) -> None:
        self._by_ranks: dict[frozenset, str] = {}
        candidates = []
        if mesh is not None:
            own = list(mesh.mesh_dim_names or ())
            candidates = [a for a in AXIS_SPANS if a != "world" and (a in own or a in FLAT_AXES)]
        for axis in candidates:
            self._by_ranks.setdefault(_ranks(mesh[axis].get_group()), axis)
        if dist.is_initialized():
            self._by_ranks.setdefault(_ranks(dist.group.WORLD), "world")
        self._by_name: dict[str, str] = {}

    def __call__(self, group) -> str:
        name = _group_name(group)
        if name not in self._by_name:
            try:
                pg = group if isinstance(group, dist.ProcessGroup) else _resolve(name)
                self._by_name[name] = self._by_ranks.get(_ranks(pg), "other")
            except (RuntimeError, ValueError, KeyError):
                self._by_name[name] = "other"
        return self._by_name[name]


def _ranks(group) -> frozenset:
    return frozenset(dist.get_process_group_ranks(group))


def _resolve(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def axis_size(axis: str, shape: Mapping[str, int]) -> int:
    """Ranks in a group of `axis` (an AXIS_SPANS name) for a mesh of `shape`."""
    size = 1
    for base in AXIS_SPANS.get(axis, ()):
        size *= shape.get(base, 1)
    return size


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def summary_lines(
    tally: CommTally,
    *,
    reference: CommTally | None = None,
    shape: Mapping[str, int] | None = None,
) -> list[str]:
    """One line per (axis, kind): payload and calls, then (with `reference`) the formula's
    payload and the difference, or (with `shape`) the bytes a rank sends over a ring."""
    keys = set(tally.bytes) | set(reference.bytes if reference else ())
    lines = []
    for kind, axis in sorted(keys, key=lambda k: (k[0] == "control", k[1], k[0])):
        got, calls = tally.bytes.get((kind, axis), 0.0), tally.calls.get((kind, axis), 0.0)
        line = f"{axis} {kind}: {format_bytes(got)} in {calls:g} calls"
        if reference is not None and kind != "control":
            want = reference.bytes.get((kind, axis), 0.0)
            diff = f"{100 * (got - want) / want:+.1f}%" if want else "not in the formula"
            line += f" (formula {format_bytes(want)}, {diff})"
        if shape is not None and kind != "control":
            line += f", {format_bytes(wire_bytes(kind, got, axis_size(axis, shape)))} on the wire"
        lines.append(line)
    return lines


def wire_bytes(kind: str, nbytes: float, group_size: int) -> float:
    """Bytes a rank sends over its links for `nbytes` of payload of `kind` on a group of
    `group_size` ranks, with ring algorithms (a lower bound for trees and the like)."""
    n = group_size
    if n <= 1:
        return 0.0
    factor = {
        "all_reduce": 2 * (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_gather": n - 1,
        "broadcast": 1.0,
        "all_to_all": (n - 1) / n,
        "send": 1.0,
        "recv": 0.0,
    }.get(kind, 1.0)
    return factor * nbytes


# --- interception --------------------------------------------------------------------------


def _tensors(value) -> list[torch.Tensor]:
    """Tensors of an argument: a tensor, a list of them, or a list of lists."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _group_name(group) -> str:
    """The name of a group as a c10d op (a boxed ProcessGroup), a functional collective (a
    name) or Python code (a ProcessGroup) passes it."""
    if isinstance(group, str):
        return group
    if isinstance(group, torch.ScriptObject):
        group = dist.ProcessGroup.unbox(group)
    return group.group_name


# (kind, index of the payload argument, index of the group argument)
_C10D = {
    "allreduce_": ("all_reduce", 0, 1),
    "allreduce_coalesced_": ("all_reduce", 0, 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1, 2),
    "reduce_scatter_": ("reduce_scatter", 1, 2),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, 2),
    "_allgather_base_": ("all_gather", 1, 2),
    "allgather_": ("all_gather", 1, 2),
    "allgather_coalesced_": ("all_gather", 1, 2),
    "allgather_into_tensor_coalesced_": ("all_gather", 1, 2),
    "broadcast_": ("broadcast", 0, 1),
    "alltoall_base_": ("all_to_all", 1, 2),
    "alltoall_": ("all_to_all", 1, 2),
    "send": ("send", 0, 1),
    "recv_": ("recv", 0, 1),
    "recv_any_source_": ("recv", 0, 1),
    "reduce_": ("reduce", 0, 1),
    "gather_": ("gather", 1, 2),
    "scatter_": ("scatter", 0, 2),  # the received part: only the root holds the inputs
}
_FUNCTIONAL = {
    "all_reduce": ("all_reduce", 0, 2),
    "all_reduce_coalesced": ("all_reduce", 0, 2),
    "all_gather_into_tensor": ("all_gather", 0, 2),
    "all_gather_into_tensor_coalesced": ("all_gather", 0, 2),
    "reduce_scatter_tensor": ("reduce_scatter", 0, 3),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0, 3),
    "all_to_all_single": ("all_to_all", 0, 3),
    "broadcast": ("broadcast", 0, 2),
    "isend": ("send", 0, 3),
    "irecv": ("recv", 0, 3),
}


def _op_table() -> dict:
    """{op overload packet: (kind, payload arg, group arg)} of the collectives torch has."""
    import torch.distributed._functional_collectives  # noqa: F401  (registers the ops)

    table = {}
    for namespace, ops in (
        (torch.ops.c10d, _C10D),
        (torch.ops._c10d_functional, _FUNCTIONAL),
        (torch.ops._c10d_functional_autograd, _FUNCTIONAL),
    ):
        for name, entry in ops.items():
            try:
                table[getattr(namespace, name)] = entry
            except (AttributeError, RuntimeError):  # not in this torch
                continue
    return table


class CommCounter(TorchDispatchMode):
    """Record every collective run on this thread (and on the autograd threads it starts)
    while active, into `tally`, keyed by kind and by the axis `axes` names for its group.

        with CommCounter(AxisNames(world.mesh)) as counter:
            engine.forward_backward(...); engine.step()
        counter.tally.to_json()

    It adds Python overhead to every op: enable it for one step, not for a run.
    """

    def __init__(self, axes: Callable[[object], str], *, on_event: Callable | None = None):
        super().__init__()
        self.axes = axes
        self.tally = CommTally()
        self.on_event = on_event  # (kind, axis, shapes, dtype) per collective, for debugging
        self._ops = _op_table()
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            # DTensor first turns the op into plain ops and collectives, which come back
            # through this mode.
            return NotImplemented
        entry = self._ops.get(getattr(func, "_overloadpacket", None))
        if entry is not None:
            self._record(func, entry, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, func, entry: tuple[str, int, int], args, kwargs) -> None:
        kind, payload_at, group_at = entry
        schema = func._schema.arguments
        values = list(args) + [kwargs.get(a.name) for a in schema[len(args) :]]
        tensors = _tensors(values[payload_at])
        axis = self.axes(values[group_at])
        numel = sum(t.numel() for t in tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            self.tally.add(kind, axis, numel, nbytes)
        if self.on_event is not None:
            self.on_event(kind, axis, [tuple(t.shape) for t in tensors], tensors[0].dtype)
