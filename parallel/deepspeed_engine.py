"""DeepSpeed as a second ZeRO engine (`parallel.engine=deepspeed`): stages 1/2/3, optimizer
states offloaded to CPU or NVMe, data parallelism only.

The plain model and Loom's own optimizer go into `deepspeed.initialize`; the DeepSpeed
config is generated from Loom's config (`build_ds_config`), never written by hand. Loss
normalisation stays Loom's: the trainer weights each micro-batch loss by
dp / (global target count) and `backward` does not divide by the accumulation steps.

LAMB stays exact under sharding. DeepSpeed hands its client optimizer one flat fp32
tensor per param group (stages 1/2) or sub-group (stage 3) holding only this rank's slice
of the concatenated parameters, so a plain LAMB would take one trust ratio per slice. From
DeepSpeed's own bookkeeping (`_hp_mapping` for stages 1/2, `grad_position` for stage 3)
`build_engine` derives where every original tensor lies in those slices, validates it,
and installs them on the optimizer (`set_flat_layouts`, parallel.flat_layout.FlatLayout): the
trust ratio then uses the norms of the original tensors, summed over ranks in one
all-reduce per slice.

Checkpoints stay layout-independent: `full_model_state` / `full_optimizer_state` return
the same full, name-keyed dicts as parallel/state.py, `save` writes them as a DCP
checkpoint like every other engine's, and `load_full_states` takes them, whatever engine
or layout wrote them.

On CUDA, DeepSpeed's FusedLamb (`optim.fused_lamb=true`, built by the trainer's optimizer
factory) is the faster choice, but under ZeRO it sees only the flat slices: its trust
ratio is per slice, not per tensor, and it clamps the ratio to [0.01, 10]. Loom's exact
Lamb (multi-tensor kernels on the GPU) is the default; FusedLamb is an explicit opt-in.

Importing this module needs neither deepspeed nor CUDA; building an engine needs deepspeed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from parallel.config import OFFLOADS, ParallelConfig
from parallel.dist import World
from parallel.engine import Batch, Engine, MicroBatch, TrainingSpec, inputs_to, sum_micro_losses
from parallel.flat_layout import FlatLayout
from parallel.state import read_full

# DeepSpeed's default bucket (5e8 elements) allocates 2 GB fp32 buffers; a bucket of a
# quarter of the model keeps a few buckets in flight for overlap and never exceeds it.
_MAX_BUCKET = 500_000_000
_MIN_BUCKET = 1 << 20
# Full-state gathers all-reduce tensors in chunks of about this many elements, so a
# checkpoint never needs a second full copy of a whole param group in one buffer.
_GATHER_CHUNK = 1 << 26
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _import_deepspeed() -> Any:
    if not deepspeed_available():
        raise ImportError(
            "parallel.engine=deepspeed needs the deepspeed package (pip install deepspeed)"
        )
    import deepspeed

    return deepspeed


def bucket_size(num_params: int) -> int:
    """Communication bucket (elements): a quarter of the model, within [1M, 5e8]."""
    return int(min(_MAX_BUCKET, max(_MIN_BUCKET, math.ceil(num_params / 4))))


def build_ds_config(
    *,
    zero: int,
    offload: str,
    nvme_path: str | None,
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    grad_clip: float,
    num_params: int,
    precision: str = "fp32",
    pin_memory: bool = False,
) -> dict:
    """The DeepSpeed config dict for Loom's settings.

    Params, grads, reductions and optimizer states stay fp32: DeepSpeed's fp16/bf16 blocks
    would turn the params themselves low-precision, so bf16 runs use Loom's autocast
    around the forward instead, and fp16 (which needs Loom's loss scaler on the grads
    DeepSpeed owns) is refused. `offload` moves optimizer states and the step to CPU
    (ZeRO-Offload, any stage) or NVMe (ZeRO-Infinity, stage 3, under `nvme_path`).
    """
    _check_ds_args(zero=zero, offload=offload, nvme_path=nvme_path, precision=precision)
    per_step = micro_batch_size * dp_size
    if micro_batch_size <= 0 or dp_size <= 0 or global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size={global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={micro_batch_size} x {dp_size} data-parallel ranks"
        )
    return {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // per_step,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": _zero_section(zero, offload, nvme_path, num_params, pin_memory),
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        # Loom's Lamb/AdamW are client optimizers DeepSpeed has not certified for ZeRO,
        # and with offload it would otherwise insist on its own CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # Loom logs and times steps itself.
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _check_ds_args(*, zero: int, offload: str, nvme_path: str | None, precision: str) -> None:
    if zero not in (1, 2, 3):
        raise ValueError(f"parallel.zero={zero}: the DeepSpeed engine runs ZeRO stage 1, 2 or 3")
    if offload not in OFFLOADS:
        raise ValueError(f"parallel.offload={offload!r} is unknown; choose one of {OFFLOADS}")
    if offload == "nvme" and zero != 3:
        raise ValueError(
            f"parallel.offload=nvme needs parallel.zero=3 (got {zero}); DeepSpeed offloads "
            "optimizer states to NVMe only under ZeRO-3"
        )
    if offload == "nvme" and not nvme_path:
        raise ValueError("parallel.offload=nvme needs parallel.nvme_path (a local NVMe directory)")
    if precision == "fp16":
        raise ValueError(
            "precision.dtype=fp16 is not supported with parallel.engine=deepspeed: DeepSpeed "
            "owns the gradients Loom's loss scaler would unscale; use bf16 or fp32"
        )
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision.dtype={precision!r} is unknown; choose fp32 or bf16")


def _zero_section(
    zero: int, offload: str, nvme_path: str | None, num_params: int, pin_memory: bool
) -> dict:
    bucket = bucket_size(num_params)
    section: dict[str, Any] = {
        "stage": zero,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        # Reduce each full bucket during backward, at every stage (DeepSpeed turns this on
        # by itself for stage 3 only).
        "overlap_comm": True,
    }
    if zero == 3:
        section["stage3_prefetch_bucket_size"] = bucket
    if offload == "cpu":
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    elif offload == "nvme":
        section["offload_optimizer"] = {
            "device": "nvme",
            "nvme_path": nvme_path,
            "pin_memory": pin_memory,
        }
    return section


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op (about a minute of C++
    per fresh machine, in every CI run).

    DeepSpeed builds it when it wraps torch.distributed on the CPU accelerator, even when
    the process group already exists, but uses it only for inference all-reduce. The
    op-compatibility table is a per-process cache DeepSpeed reads before building; marking
    the op incompatible there makes it fall back to plain torch.distributed.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _all_reduce_sum(tensor: Tensor, group: Any) -> Tensor:
    """Sum over `group`, on the device its backend needs (CPU-offloaded flats under NCCL
    alone; a cpu:gloo,cuda:nccl group takes either)."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    elif "nccl" in backend:
        device = tensor.device
    else:
        device = torch.device("cpu")
    out = tensor.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _reduce_layout(tensor: Tensor, layout: FlatLayout) -> Tensor:
    return _all_reduce_sum(tensor, layout.group)


def zero12_layouts(zopt: Any, names: dict[int, str]) -> dict[Tensor, FlatLayout]:
    """Stages 1/2 (DeepSpeedZeroOptimizer): one flat fp32 partition per param group.

    DeepSpeed maps every parameter with a slice on this rank to its fp32 master fragment
    (`p._hp_mapping`, the bookkeeping behind its own safe_get_full_fp32_param): the
    fragment is flat[start : start + numel] and holds elements lp.start onwards of p.
    """
    layouts = {}
    for i, params in enumerate(zopt.bit16_groups):
        flat = zopt.single_partition_of_fp32_groups[i]
        starts, lengths, ids, offsets = [], [], [], []
        for j, p in enumerate(params):
            frag = getattr(p, "_hp_mapping", None)
            if frag is None:
                continue
            hp, lp = frag.get_hp_fragment_address(), frag.lp_fragment_address
            expected = flat.data_ptr() + hp.start * flat.element_size()
            if hp.numel != lp.numel or frag.hp_fragment.data_ptr() != expected:
                raise RuntimeError(
                    f"DeepSpeed's fp32 fragment of {names[id(p)]} is not where its mapping "
                    f"says (flat[{hp.start}:{hp.start + hp.numel}] of group {i})"
                )
            starts.append(hp.start)
            lengths.append(hp.numel)
            ids.append(j)
            offsets.append(lp.start)
        layouts[flat] = FlatLayout(
            starts=tuple(starts),
            lengths=tuple(lengths),
            tensor_ids=tuple(ids),
            offsets=tuple(offsets),
            numels=tuple(p.numel() for p in params),
            names=tuple(names[id(p)] for p in params),
            group=zopt.real_dp_process_group[i],
        )
    return layouts


def zero3_layouts(zopt: Any, names: dict[int, str]) -> dict[Tensor, FlatLayout]:
    """Stage 3 (DeepSpeedZeroOptimizer_Stage3): one flat fp32 tensor per sub-group.

    Rank r holds elements [r * pn, (r + 1) * pn) of every flattened parameter
    (pn = p.partition_numel()); `grad_position[id] = [sub_group, offset, pn]` places that
    slice in fp32_partitioned_groups_flat[sub_group]. Past p.ds_numel the slice is padding
    DeepSpeed leaves uninitialised, so it is left out of the pieces.
    """
    layouts = {}
    for s, params in enumerate(zopt.fp16_groups):
        flat = zopt.fp32_partitioned_groups_flat[s]
        lp_flat = zopt.fp16_partitioned_groups_flat[s]
        starts, lengths, ids, offsets = [], [], [], []
        for j, p in enumerate(params):
            sub, off, pn = zopt.grad_position[zopt.get_param_id(p)]
            rank = zopt._get_param_partition_rank(p)
            # The module's partition is a view into the flat low-precision buffer.
            lp_moved = lp_flat is not None and (
                p.ds_tensor.data_ptr() != lp_flat.data_ptr() + off * lp_flat.element_size()
            )
            if sub != s or pn != p.partition_numel() or lp_moved:
                raise RuntimeError(
                    f"DeepSpeed's partition of {names[id(p)]} is not where grad_position says "
                    f"(sub-group {sub} offset {off} length {pn}, expected sub-group {s})"
                )
            valid = max(0, min(pn, p.ds_numel - rank * pn))
            if valid:
                starts.append(off)
                lengths.append(valid)
                ids.append(j)
                offsets.append(rank * pn)
        layouts[flat] = FlatLayout(
            starts=tuple(starts),
            lengths=tuple(lengths),
            tensor_ids=tuple(ids),
            offsets=tuple(offsets),
            numels=tuple(p.ds_numel for p in params),
            names=tuple(names[id(p)] for p in params),
            group=zopt.sub_group_process_groups[s],
        )
    return layouts


def check_coverage(layouts: dict[Tensor, FlatLayout]) -> None:
    """Collective: the pieces of all ranks cover every original tensor exactly once.

    Sums, per tensor, the piece lengths and the sums of the element indices the pieces
    cover; both must equal those of the whole tensor (a gap plus an overlap of the same
    size would have to shift the index sum by exactly zero to pass).
    """
    for flat, layout in layouts.items():
        layout.check(flat.numel())
        got = torch.zeros(2, layout.num_tensors, dtype=torch.int64)
        for n, tid, off in zip(layout.lengths, layout.tensor_ids, layout.offsets, strict=True):
            got[0, tid] += n
            got[1, tid] += n * off + n * (n - 1) // 2
        got = _all_reduce_sum(got, layout.group).cpu()
        numels = torch.tensor(layout.numels, dtype=torch.int64)
        want = torch.stack([numels, numels * (numels - 1) // 2])
        bad = (got != want).any(0).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(
                "DeepSpeed partitions do not cover each tensor exactly once: "
                + ", ".join(layout.name(t) for t in bad[:5])
            )


def _chunks(numels: tuple[int, ...], limit: int) -> Iterator[list[int]]:
    """Consecutive tensor ids whose total size stays under `limit` (or one tensor)."""
    chunk: list[int] = []
    size = 0
    for tid, n in enumerate(numels):
        if chunk and size + n > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(tid)
        size += n
    if chunk:
        yield chunk


class DeepSpeedEngine(Engine):
    """A model under `deepspeed.initialize`, with Loom's step contract.

    Per micro-batch: `outputs = engine(**inputs)`, `engine.backward(weighted_loss)`,
    `engine.micro_step()`. DeepSpeed reduces, clips (`gradient_clipping`) and steps at the
    end of each accumulation; `micro_step` returns True there. `param_groups` are the client
    optimizer's, so an LR schedule writing group["lr"] reaches the update. Built with a
    `TrainingSpec` (`build_deepspeed_engine`), it is also an `Engine` the trainer drives.
    """

    def __init__(
        self,
        engine: Any,
        *,
        optimizer: torch.optim.Optimizer,
        layouts: dict[Tensor, FlatLayout],
        world: World,
        spec: TrainingSpec | None = None,
    ) -> None:
        self.engine = engine
        self.optimizer = optimizer
        self.layouts = layouts
        self.world = world
        self.spec = spec
        self.zero_stage = int(engine.zero_optimization_stage())
        self._params = dict(engine.module.named_parameters())
        self._pieces = self._index_pieces()
        self._group_names = self._names_per_group()

    # -- the Engine interface ------------------------------------------------------------
    def forward_backward(
        self, micro_batches: list[MicroBatch], weights: dict[str, float]
    ) -> dict[str, Tensor]:
        self.train()
        totals, keys = None, sorted(micro_batches[0][1])
        for inputs, labels in micro_batches:
            sums = self._forward_loss(self.engine, inputs, labels)
            self.backward(sum(sums[k] * weights[k] for k in sums))
            self.micro_step()  # steps only at the end of the accumulation
            totals = sum_micro_losses(totals, sums, keys)
        return dict(zip(keys, totals.unbind(0), strict=True))

    def _forward_loss(self, model: Callable, inputs: Batch, labels: Batch) -> dict:
        inputs, labels = inputs_to(self.world.device, inputs), inputs_to(self.world.device, labels)
        with self.spec.forward_context():
            outputs = model(**inputs)
        if self.spec.loss_targets is not None:
            labels = {**labels, **self.spec.loss_targets(inputs)}
        return self.spec.loss_fn(outputs, labels)

    def step(self) -> Tensor | float:
        """DeepSpeed clipped and stepped at the last micro-batch; the global gradient norm
        before clipping as DeepSpeed keeps it (a device tensor is not read here; nan before
        any step)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return math.nan
        return norm.detach() if isinstance(norm, Tensor) else float(norm)

    @torch.no_grad()
    def evaluate(self, inputs: Batch, labels: Batch) -> dict[str, Tensor]:
        self.module.eval()
        return self._forward_loss(self.module, inputs, labels)

    def save(self, directory: Path) -> None:
        """The full states, gathered on every rank, written as one DCP checkpoint (each
        replicated entry is written once)."""
        state = {"model": self.full_model_state(), "optim": self.full_optimizer_state()}
        dcp.save(state, checkpoint_id=str(directory))

    def load(self, directory: Path, *, full: dict | None = None) -> None:
        full = full if full is not None else read_full(directory)
        self.load_full_states(full["model"], full["optim"])

    # -- DeepSpeed's own steps -----------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The plain model (with DeepSpeed's ZeRO-3 gather hooks): use it for evaluation."""
        return self.engine.module

    def forward(self, **inputs: Tensor) -> Any:
        return self.engine(**inputs)

    __call__ = forward

    def train(self, mode: bool = True) -> DeepSpeedEngine:
        self.engine.train(mode)
        return self

    def eval(self) -> DeepSpeedEngine:
        return self.train(False)

    def backward(self, loss: Tensor) -> None:
        # The trainer's weights already include the 1 / accumulation factor.
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> bool:
        """Call after every micro-batch; True when it closed an accumulation (stepped)."""
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        self.engine.step()
        return boundary

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def destroy(self) -> None:
        self.engine.destroy()

    # -- bookkeeping ----------------------------------------------------------------
    def _index_pieces(self) -> dict[str, tuple[Tensor, FlatLayout, int | None]]:
        """name -> (flat, layout, index of this rank's piece or None)."""
        out: dict[str, tuple[Tensor, FlatLayout, int | None]] = {}
        for flat, layout in self.layouts.items():
            mine = {tid: k for k, tid in enumerate(layout.tensor_ids)}
            for tid, name in enumerate(layout.names):
                out[name] = (flat, layout, mine.get(tid))
        missing = [n for n, p in self._params.items() if p.requires_grad and n not in out]
        if missing:
            raise RuntimeError(f"DeepSpeed left trainable params out of its partitions: {missing}")
        return out

    def _names_per_group(self) -> list[list[str]]:
        """Param names of each client optimizer group, in DeepSpeed's order."""
        zopt = self.engine.optimizer
        groups: list[list[str]] = [[] for _ in self.optimizer.param_groups]
        if self.zero_stage == 3:
            for s, layout in enumerate(self.layouts.values()):
                groups[zopt.sub_group_to_group_id[s]].extend(layout.names)
        else:
            for i, layout in enumerate(self.layouts.values()):
                groups[i].extend(layout.names)
        return groups

    def _shape(self, name: str) -> torch.Size:
        p = self._params[name]
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape

    def _gather(self, source: Callable[[Tensor], Tensor | None]) -> dict[str, Tensor]:
        """Full tensors by name, assembled from every rank's pieces of `source(flat)`
        (collective: every rank calls it with the same flats)."""
        out = {}
        for flat, layout in self.layouts.items():
            src = source(flat)
            if src is None:
                continue
            for chunk in _chunks(layout.numels, _GATHER_CHUNK):
                sizes = [layout.numels[t] for t in chunk]
                base = dict(zip(chunk, accumulate([0, *sizes[:-1]]), strict=True))
                buf = torch.zeros(sum(sizes), dtype=src.dtype, device=src.device)
                for start, n, tid, off in zip(
                    layout.starts, layout.lengths, layout.tensor_ids, layout.offsets, strict=True
                ):
                    if tid in base:
                        buf.narrow(0, base[tid] + off, n).copy_(src.narrow(0, start, n))
                buf = _all_reduce_sum(buf, layout.group).cpu()
                for tid, full in zip(chunk, buf.split(sizes), strict=True):
                    name = layout.names[tid]
                    out[name] = full.view(self._shape(name)).clone()
        return out

    def _scatter(self, flat_tensor: Tensor, layout: FlatLayout, values: dict[str, Tensor]) -> None:
        """Write this rank's pieces of full tensors `values[name]` into `flat_tensor`."""
        for start, n, tid, off in zip(
            layout.starts, layout.lengths, layout.tensor_ids, layout.offsets, strict=True
        ):
            full = values[layout.names[tid]].reshape(-1)
            flat_tensor.narrow(0, start, n).copy_(full.narrow(0, off, n))

    # -- layout-independent checkpoints --------------------------------------------
    def full_model_state(self) -> dict[str, Tensor]:
        """Full fp32 weights from DeepSpeed's fp32 masters, keyed like the plain model's
        state_dict (tied params under each name), plus persistent buffers, on CPU.
        Collective; every rank gets the whole dict."""
        weights = self._gather(lambda flat: flat)
        canonical = {id(p): n for n, p in self._params.items()}
        state = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if canonical[id(p)] in weights:
                state[name] = weights[canonical[id(p)]].clone()
        for name, buf in self._persistent_buffers():
            state[name] = buf.detach().cpu().clone()
        return state

    def _persistent_buffers(self) -> Iterator[tuple[str, Tensor]]:
        for prefix, mod in self.module.named_modules(remove_duplicate=False):
            for name, buf in mod._buffers.items():
                if buf is not None and name not in mod._non_persistent_buffers_set:
                    yield (f"{prefix}.{name}" if prefix else name), buf

    def full_optimizer_state(self) -> dict:
        """The client optimizer's state as parallel/state.py writes it:
        {"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]}.
        Tensors the size of a flat partition are gathered to full tensors; scalars (the
        step) are shared by every param of a partition. Collective; every rank gets it."""
        opt = self.optimizer
        scalars: dict[str, dict] = {}
        sharded: dict[str, list[str]] = {}
        for flat, layout in self.layouts.items():
            st = opt.state.get(flat, {})
            keys = [k for k, v in st.items() if torch.is_tensor(v) and v.shape == flat.shape]
            rest = {k: v for k, v in st.items() if k not in keys}
            for name in layout.names if st else ():
                scalars[name], sharded[name] = rest, keys
        key_order = dict.fromkeys(k for keys in sharded.values() for k in keys)
        gathered = {
            key: self._gather(lambda flat, key=key: opt.state.get(flat, {}).get(key))
            for key in key_order
        }
        state = {}
        for name in self._pieces:
            if name not in scalars:
                continue
            entry = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars[name].items()}
            entry.update({k: gathered[k][name] for k in sharded[name]})
            state[name] = entry
        groups = [
            {**{k: v for k, v in g.items() if k in opt.defaults}, "params": list(names)}
            for g, names in zip(opt.param_groups, self._group_names, strict=True)
        ]
        return {"state": state, "param_groups": groups}

    def load_full_states(self, model_state: dict[str, Tensor], optim_state: dict | None) -> None:
        """Load full, name-keyed states written under any engine and layout (every rank
        passes the whole dicts). `optim_state` None keeps a fresh optimizer."""
        missing = [n for n in self._pieces if n not in model_state]
        if missing:
            raise ValueError(f"model state has no entry for {missing[:5]}")
        for name in self._pieces:
            want = math.prod(self._shape(name))
            if model_state[name].numel() != want:
                raise ValueError(
                    f"model state {name!r} has {model_state[name].numel()} elements; the model "
                    f"has {want}"
                )
        with torch.no_grad():
            self._load_weights(model_state)
            for name, buf in self._persistent_buffers():
                if name in model_state:
                    buf.copy_(model_state[name])
        if optim_state is not None:
            self._load_optimizer(optim_state)

    def _load_weights(self, values: dict[str, Tensor]) -> None:
        """fp32 masters and the module's own params (DeepSpeed keeps both)."""
        for flat, layout in self.layouts.items():
            self._scatter(flat, layout, values)
        for name, (_, layout, k) in self._pieces.items():
            p, full = self._params[name], values[name].reshape(-1)
            if self.zero_stage != 3:
                p.data.copy_(full.view_as(p))  # stages 1/2: every rank holds every param
                continue
            if k is not None:  # this rank's partition of the param
                n, off = layout.lengths[k], layout.offsets[k]
                p.ds_tensor.data.narrow(0, 0, n).copy_(full.narrow(0, off, n))
            if p.data.numel() == p.ds_numel:  # gathered now or persistent
                p.data.copy_(full.view_as(p.data))

    def _load_optimizer(self, optim_state: dict) -> None:
        opt, saved = self.optimizer, optim_state["state"]
        self._load_param_groups(optim_state["param_groups"])
        for flat, layout in self.layouts.items():
            present = [n for n in layout.names if n in saved]
            if not present:
                continue  # never stepped when saved
            if len(present) != layout.num_tensors:
                absent = [n for n in layout.names if n not in saved]
                raise ValueError(f"optimizer state covers only part of a partition: {absent[:5]}")
            target = opt.state[flat]
            for key, value in saved[present[0]].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if key not in target:
                        target[key] = torch.zeros_like(flat)
                    self._scatter(target[key], layout, {n: saved[n][key] for n in layout.names})
                    continue
                others = {float(saved[n][key]) for n in layout.names}
                if len(others) > 1:
                    raise ValueError(
                        f"optimizer state {key!r} differs within one DeepSpeed partition "
                        f"({sorted(others)}); it keeps one value per partition"
                    )
                target[key] = value.clone() if torch.is_tensor(value) else value

    def _load_param_groups(self, saved_groups: list[dict]) -> None:
        saved = [g for g in saved_groups if g["params"]]
        for group, names in zip(self.optimizer.param_groups, self._group_names, strict=True):
            match = [g for g in saved if set(g["params"]) == set(names)]
            if not match:
                raise ValueError(
                    f"optimizer state has no param group holding exactly {names[:3]}... "
                    f"({len(names)} params)"
                )
            group.update({k: v for k, v in match[0].items() if k != "params"})


def _check_engine_args(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ds_config: dict,
    *,
    world: World,
    exact_lamb: bool,
) -> None:
    if world.dp_size != world.world_size:
        raise ValueError(
            f"the DeepSpeed engine is data parallel only: dp_size={world.dp_size} but "
            f"world_size={world.world_size}"
        )
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device")
    if offload == "nvme" and hasattr(optimizer, "set_flat_layouts") and exact_lamb:
        raise ValueError(
            "parallel.offload=nvme with optim.name=lamb: NVMe offload keeps the optimizer "
            "partitions on disk between steps, where exact LAMB cannot see them; use "
            "parallel.offload=cpu, or optim.name=adamw"
        )
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"the DeepSpeed engine trains every param; these are frozen: {frozen[:5]}")


def build_deepspeed_engine(
    model: nn.Module, cfg: ParallelConfig, *, world: World, spec: TrainingSpec
) -> DeepSpeedEngine:
    """The DeepSpeed engine of `cfg` around `model`, with the spec's optimizer as client."""
    optimizer = spec.make_optimizer(model)
    config = build_ds_config(
        zero=cfg.zero,
        offload=cfg.offload,
        nvme_path=cfg.nvme_path,
        global_batch_size=spec.global_batch_size,
        micro_batch_size=spec.micro_batch_size,
        dp_size=world.dp_size,
        grad_clip=spec.grad_clip,
        num_params=sum(x.numel() for x in model.parameters()),
        precision=spec.precision,
        pin_memory=world.device.type == "cuda",
    )
    engine = initialize_engine(model.to(world.device), optimizer, config, world=world)
    engine.spec = spec
    return engine


def initialize_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ds_config: dict,
    *,
    world: World,
    exact_lamb: bool = True,
) -> DeepSpeedEngine:
    """`deepspeed.initialize` on the plain model and Loom's optimizer; installs exact LAMB.

    Reuses the torch.distributed group the caller set up (a one-process group is created
    for a single process). `exact_lamb=False` leaves Lamb with one trust ratio per flat
    partition, as DeepSpeed would run any client optimizer (for comparisons only).
    """
    deepspeed = _import_deepspeed()
    _check_engine_args(model, optimizer, ds_config, world=world, exact_lamb=exact_lamb)
    if not dist.is_initialized():
        # One process: an in-memory store needs no address or port.
        backend = "nccl" if world.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    _skip_shm_comm_build()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    names = {id(p): n for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(
        model=model.to(world.device), optimizer=optimizer, config=ds_config
    )
    zopt = engine.optimizer
    if getattr(zopt, "optimizer", None) is not optimizer:
        raise RuntimeError("DeepSpeed did not wrap the given optimizer in a ZeRO optimizer")
    if engine.zero_optimization_stage() == 3:
        layouts = zero3_layouts(zopt, names)
    else:
        layouts = zero12_layouts(zopt, names)
    check_coverage(layouts)
    if hasattr(optimizer, "set_flat_layouts") and exact_lamb:
        optimizer.set_flat_layouts(layouts, reduce_fn=_reduce_layout)
    return DeepSpeedEngine(engine, optimizer=optimizer, layouts=layouts, world=world)
