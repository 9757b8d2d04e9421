"""The training loop: data -> objective -> forward/backward with accumulation -> step.

Loss normalisation: every micro-batch contributes its summed token loss divided by the
number of target tokens in the whole global batch (all micro-batches, all DP ranks), so
the gradient is the same for any split of the global batch into ranks and micro-batches.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from common.errors import CheckpointError, ConfigError, DataError
from common.log import get_logger, log_rank0, warn_once
from data_pipeline.dataset import PackedDataset
from data_pipeline.loader import Loader, build_loader
from data_pipeline.objectives import (
    IGNORE_INDEX,
    Objective,
    build_objective,
    row_length,
    split_batch,
)
from data_pipeline.sample_corpus import ensure_sample_corpus
from models import build_model, param_counts
from models.flops import known_peak_flops
from models.moe import moe_layers, set_aux_loss_weight
from parallel import dist
from parallel.engine import TrainingSpec
from parallel.launch_env import launch_env
from parallel.parallelize import build_engine, place_frozen
from trainer.checkpoint import (
    CheckpointManager,
    load_file,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from trainer.comm_report import CommAccounting
from trainer.config import JobConfig, to_yaml
from trainer.distill import (
    DistillLoss,
    TeacherTargets,
    check_teacher,
    describe_teacher,
    distill_labels,
    distill_outputs,
    init_student_from_teacher,
    load_teacher_weights,
    read_teacher,
    teacher_forward_flops,
)
from trainer.init_from import init_weights, read_weights
from trainer.loss import (
    summed_losses,
    target_counts,
    task_name,
    task_weight,
    with_chunked_labels,
)
from trainer.metrics import MetricsLogger, Throughput, job_flops_per_token, moe_metrics
from trainer.optim import build_optimizer
from trainer.precision import LossScaler, autocast
from trainer.schedule import LRSchedule
from trainer.stop import StopRequest, deadline_from, exit_state_path, write_exit_state
from trainer.watchdog import Watchdog

log = get_logger("loom.trainer")
# Validation rows get sample ids far above any training id, so their objective
# randomness never coincides with a training sample's.
EVAL_ID_OFFSET = 1 << 60


@dataclass
class Data:
    loader: Loader
    objective: Objective
    val: list[tuple[str, PackedDataset, float]]  # (source path, validation split, weight)
    seq_len: int


def corpus_sources(job: JobConfig, world: dist.World, *, row_len: int) -> list[tuple[str, float]]:
    """(path, weight) of every training corpus; prepares the built-in one on first use."""
    if job.data.sources:
        return [(s.path, s.weight) for s in job.data.sources]
    if job.data.path is not None:
        return [(job.data.path, 1.0)]

    def prepare():
        return ensure_sample_corpus(
            cache_dir=job.data.cache_dir,
            tokenizer_spec=job.data.tokenizer,
            seq_len=row_len - 1,
            val_fraction=job.data.val_fraction,
        )

    if world.is_main:  # rank 0 prepares, the others then find it in the cache
        prepare()
    dist.barrier(world)
    return [(str(prepare()), 1.0)]


def open_data(job: JobConfig, world: dist.World) -> Data:
    """The loader of the global sample stream (objective applied) and the validation splits."""
    name = job.data.objective or job.model.objective
    seq_len = job.data.seq_len or job.model.max_seq_len
    row_len = row_length(name, cfg=job.data, seq_len=seq_len)
    sources = corpus_sources(job, world, row_len=row_len)
    first = PackedDataset(sources[0][0], "train")
    if first.sample_len != row_len:
        raise DataError(
            f"{Path(sources[0][0]) / 'manifest.json'} holds rows of {first.sample_len} tokens; "
            f"data.objective={name} at data.seq_len={seq_len} reads rows of {row_len} "
            f"(prepare it with --seq-len {row_len - 1})"
        )
    objective = build_objective(
        name, cfg=job.data, tokenizer=first.tokenizer, seq_len=seq_len, seed=job.trainer.seed
    )
    t = job.trainer
    loader = build_loader(
        sources,
        split="train",
        global_batch_size=t.global_batch_size,
        micro_batch_size=job.parallel.rows_per_call(
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_size=world.dp_size,
        ),
        dp_rank=world.dp_rank,
        dp_size=world.dp_size,
        seed=t.seed,
        num_workers=job.data.num_workers,
        transform=objective,
        # A model that carries memory between steps reads consecutive segments per row.
        segment_streams=job.model.mem_len > 0,
    )
    total = sum(w for _, w in sources)
    val = []
    if t.eval_every:  # a corpus prepared with --val-fraction 0 trains without evaluation
        val = [(path, PackedDataset(path, "val"), w / total) for path, w in sources]
    return Data(loader=loader, objective=objective, val=val, seq_len=seq_len)


def model_vocab_size(job: JobConfig, tokenizer_vocab: int) -> int:
    vocab = job.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab} ids)"
        )
    return job.model.padded_vocab_size(vocab)


def peak_flops_total(job: JobConfig, world: dist.World) -> float | None:
    peak = job.trainer.peak_flops
    if peak is None and world.device.type == "cuda":
        peak = known_peak_flops(torch.cuda.get_device_name(world.device), job.precision.dtype)
    if peak is None:
        warn_once("MFU is reported as null: set trainer.peak_flops for this device")
        return None
    return peak * world.world_size


def _rows_mask(real_B: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-row flag over a labels tensor of any rank."""
    return real_B.view(-1, *([1] * (labels.dim() - 1))).expand_as(labels)


def host_values(record: dict) -> dict:
    """The record with its tensors (device losses, the gradient norm) read as numbers. A
    step skipped for an fp16 overflow (its "overflow" verdict) has no gradient norm."""
    out = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
    if out.pop("overflow", 0.0):
        out["grad_norm"] = None
    return out


class StopAgreed(Exception):
    """Every rank agreed to stop (raised between evaluation batches)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Trainer:
    """One training job on this process's share of the world."""

    def __init__(self, job: JobConfig, world: dist.World) -> None:
        self.job, self.world, self.t = job, world, job.trainer
        self.run_dir = Path(self.t.out_dir)
        self.env = launch_env()
        # The time limit counts from here; the stop signals are handled from fit() on.
        self.stop = StopRequest(
            user_signal=self.t.stop_signal,
            deadline=deadline_from(self.t.time_limit, started=time.time()),
            margin_s=self.t.stop_margin_s,
        )
        torch.manual_seed(self.t.seed)  # identical initial weights on every rank
        self.data = open_data(job, world)
        self.seq_len = self.data.seq_len
        vocab = self.vocab_size = model_vocab_size(job, self.data.loader.vocab_size)
        model = build_model(job.model, vocab_size=vocab)
        model.loss_chunk_tokens = self.t.loss_chunk_tokens
        self.scaler = LossScaler(job.precision, device=world.device)
        loss_fn, loss_targets, teacher_flops = summed_losses, None, 0.0
        if job.distill.enabled:
            loss_fn, loss_targets, teacher_flops = self._distillation(model, vocab)
        if self.t.init_from is not None:
            init_weights(model, read_weights(self.t.init_from), source=self.t.init_from)
        self.counts = param_counts(model)  # before sharding hides full shapes
        self.engine = build_engine(
            model,
            job.parallel,
            world=world,
            model_cfg=job.model,
            spec=TrainingSpec(
                make_optimizer=functools.partial(
                    build_optimizer, cfg=job.optim, skip_on_device=self.scaler.enabled
                ),
                loss_fn=loss_fn,
                loss_targets=loss_targets,
                scaler=self.scaler,
                forward_context=lambda: autocast(job.precision, world.device),
                precision=job.precision.dtype,
                grad_clip=job.optim.grad_clip,
                global_batch_size=self.t.global_batch_size,
                micro_batch_size=self.t.micro_batch_size,
            ),
        )
        self.schedule = LRSchedule(job.optim, max_steps=self.t.max_steps)
        self.moe = moe_layers(self.engine.module)
        # Dropout streams differ per data-parallel rank; weights above did not.
        torch.manual_seed(self.t.seed + 1 + world.dp_rank)
        self.ckpt = CheckpointManager(
            self.run_dir, keep=self.t.keep, rank=world.rank, barrier=lambda: dist.barrier(world)
        )
        self.start_step = self._resume()
        # A teacher's forward is work the devices do too: MFU counts it beside the student's.
        self.flops_per_token = (
            job_flops_per_token(job, vocab_size=vocab, seq_len=self.seq_len) + teacher_flops
        )
        self._describe(vocab)

    def _distillation(self, model: torch.nn.Module, vocab: int) -> tuple:
        """(loss function, loss targets hook, teacher forward FLOPs per token) of
        distill.*: the teacher read, checked against the student, frozen and placed by the
        job's layout, and the student given the outputs (and projections) the loss needs."""
        d, job = self.job.distill, self.job
        teacher_cfg, state = read_teacher(d.teacher)
        rows = int(state["wte.weight"].shape[0]) if "wte.weight" in state else vocab
        check_teacher(job.model, teacher_cfg, d, rows=vocab, teacher_rows=rows)
        teacher = build_model(teacher_cfg, vocab_size=rows)
        load_teacher_weights(teacher, state, source=d.teacher)
        outputs = distill_outputs(d)
        model.distill_outputs = teacher.distill_outputs = outputs
        if "hidden" in outputs and teacher_cfg.d_model != job.model.d_model:
            model.add_distill_projections(teacher_cfg.d_model, embedding=d.embedding_weight > 0)
        if d.init_from_teacher:
            init_student_from_teacher(model, state, n_teacher=teacher_cfg.n_layer, source=d.teacher)
        flops = teacher_forward_flops(teacher_cfg, vocab_size=rows, seq_len=self.seq_len)
        describe_teacher(teacher_cfg, param_counts(teacher)["total"], flops)
        teacher = place_frozen(
            teacher,
            job.parallel,
            world=self.world,
            model_cfg=teacher_cfg,
            precision=job.precision.dtype,
        )
        device = self.world.device
        hook = TeacherTargets(teacher, lambda: autocast(job.precision, device))
        loss = DistillLoss(d, n_student=job.model.n_layer, n_teacher=teacher_cfg.n_layer)
        return loss, hook, flops

    def _describe(self, vocab: int) -> None:
        counts = self.counts
        log_rank0(
            "model %s: %.2fM parameters (%.2fM non-embedding), vocab %d, %.3g FLOPs/token",
            self.job.model.name,
            counts["total"] / 1e6,
            counts["non_embedding"] / 1e6,
            vocab,
            self.flops_per_token,
        )
        loader = self.data.loader
        log_rank0(
            "data: %d source(s), %d train rows, objective %s, %d tokens per sample; global "
            "batch %d = %d ranks x %d micro-batches x %d",
            len(loader.datasets),
            sum(len(d) for d in loader.datasets),
            self.job.data.objective or self.job.model.objective,
            self.seq_len,
            self.t.global_batch_size,
            self.world.dp_size,
            self.accumulation,
            self.t.micro_batch_size,
        )

    @property
    def accumulation(self) -> int:
        return self.t.global_batch_size // (self.t.micro_batch_size * self.world.dp_size)

    def _resume(self) -> int:
        path = resolve_resume(self.ckpt, self.t.resume)
        if path is None:
            return 0
        state = self.ckpt.load(path)
        full = {"model": state["model"], "optim": state["optim"]} if "model" in state else None
        try:
            self.engine.load(path / "dcp", full=full)
        except (RuntimeError, ValueError, KeyError, CheckpointException) as exc:
            # another model's state, or a bad one
            raise CheckpointError(
                f"{path}: does not load into this model and layout ({_load_failure(exc)}); "
                "set trainer.resume=never or another trainer.out_dir to start afresh"
            ) from exc
        self.data.loader.load_state_dict(state["trainer"]["loader"])
        self.scaler.load_state_dict(state["trainer"]["scaler"])
        if self.job.model.mem_len > 0:
            self._load_memory(path)
        set_rng_state(state["rng"])
        step = int(state["trainer"]["step"])
        log_rank0("resumed from %s at step %d", path, step)
        return step

    def save(self, step: int) -> None:
        trainer_state = {
            "step": step,
            "loader": self.data.loader.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        per_rank = {"rng": rng_state()}
        if self.job.model.mem_len > 0:
            per_rank["memory"] = self._memory_by_stream()
        path = self.ckpt.save(
            step,
            shared={"trainer.pt": trainer_state},
            per_rank=per_rank,
            sharded=self.engine.save,
        )
        log_rank0("saved %s", path)

    def _first_stream(self, slot: int, rows: int) -> int:
        """The segment stream (row of the global batch) of the first row of this rank's
        micro-batch `slot`, of `rows` rows."""
        per_rank = self.t.global_batch_size // self.world.dp_size
        return self.world.dp_rank * per_rank + slot * rows

    def _memory_by_stream(self) -> dict[int, list[torch.Tensor]]:
        """The model's segment memory by stream: {stream: n_layer tensors (M, D)}, so a
        resume at another data-parallel or micro-batch size finds each stream's memory."""
        out = {}
        for slot, mems in self.engine.module.memory_state().items():
            rows = mems[0].shape[0]
            for i in range(rows):
                out[self._first_stream(slot, rows) + i] = [m[i] for m in mems]
        return out

    def _load_memory(self, path: Path) -> None:
        """Every rank's saved memory by stream, given back to this rank's slots; a stream
        without memory (the global batch size changed) starts without, said once."""
        saved: dict[int, list[torch.Tensor]] = {}
        for file in sorted(path.glob("memory_rank*.pt")):
            saved |= load_file(file)
        rows, state = self.t.micro_batch_size, {}
        for slot in range(self.accumulation):
            streams = [self._first_stream(slot, rows) + i for i in range(rows)]
            if not all(j in saved for j in streams):
                warn_once(
                    f"{path}: no segment memory saved for streams {streams}; they start afresh"
                )
                continue
            layers = zip(*(saved[j] for j in streams), strict=True)
            state[slot] = [torch.stack(per_row) for per_row in layers]
        self.engine.module.load_memory_state(state)

    def train_step(self, step: int) -> dict:
        lr = self.schedule.apply(self.engine.optimizer, step)
        if self.moe:  # one row's aux losses weigh as a row of the objective (DDP-averaged)
            weight = self.world.dp_size / self.t.global_batch_size
            scale = self.scaler.scale_tensor if self.scaler.enabled else None
            set_aux_loss_weight(self.engine.module, weight, scale=scale)
        micro = [self._split(b) for b in self.data.loader.next_batch()]
        if self.job.model.mem_len > 0:  # micro-batch m of every step continues the last one's
            micro = [
                ({**inputs, "memory_slot": m}, labels) for m, (inputs, labels) in enumerate(micro)
            ]
        keys = sorted(micro[0][1])
        local = [sum(target_counts(labels)[k] for _, labels in micro) for k in keys]
        counts = dist.dp_sum(torch.tensor(local, dtype=torch.float64), self.world).tolist()
        # DDP averages gradients over ranks; the weight dp / (global targets of the task)
        # undoes that average and normalises each task by its own global count (and scales
        # it by the task's weight in the loss: ELECTRA's lambda).
        scale = [task_weight(k, self.job.model, self.job.distill) for k in keys]
        weights = {
            k: w * self.world.dp_size / max(n, 1.0)
            for k, n, w in zip(keys, counts, scale, strict=True)
        }
        losses = self.engine.forward_backward(micro, weights)
        grad_norm = self.engine.step()
        sums = dist.dp_sum(torch.stack([losses[k] for k in keys]), self.world)
        # Losses and the norm stay tensors on the device: they are read (a wait for the
        # GPU) only when a step is logged, never inside a step. The counts and weights are
        # host numbers: a tensor made of them would be a copy to the device, a wait too.
        task = torch.stack([sums[i] / max(n, 1.0) for i, n in enumerate(counts)])
        loss = sum(task[i] * w for i, w in enumerate(scale))
        record = {
            "loss": loss if len(keys) > 1 else task[0],
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": self.scaler.scale_tensor,
            "skipped_steps": self.engine.skipped_steps,
        }
        if self.scaler.found_inf is not None:  # fp16: read with the rest when logged
            record["overflow"] = self.scaler.found_inf
        if len(keys) > 1:
            record.update({task_name(k): task[i] for i, k in enumerate(keys)})
        return record

    def _split(self, batch: dict) -> tuple[dict, dict]:
        """(model inputs, labels) of a micro-batch; the inputs carry the language-model
        labels too when the loss is chunked inside the model, and the labels the
        distillation tasks' scored tokens when distilling."""
        inputs, labels = split_batch(batch)
        labels = self._with_distill_labels(inputs, labels)
        return with_chunked_labels(inputs, labels, self.t.loss_chunk_tokens), labels

    def _with_distill_labels(self, inputs: dict, labels: dict) -> dict:
        if not self.job.distill.enabled:
            return labels
        return labels | distill_labels(inputs, self.job.distill.tasks)

    @torch.no_grad()
    def evaluate(self, between_batches=None) -> dict[str, float]:
        """Validation loss: the weight-averaged loss of every source's validation split,
        plus each source's own loss when the data is a blend. `between_batches()` runs
        after each batch (the loop's watchdog beat and stop agreement, which may raise
        StopAgreed)."""
        losses = {
            path: self._evaluate_split(val, between_batches) for path, val, _ in self.data.val
        }
        out = {"val_loss": sum(w * losses[path] for path, _, w in self.data.val)}
        if len(losses) > 1:
            out.update({f"val_loss/{Path(path).name}": v for path, v in losses.items()})
        return out

    def _evaluate_split(self, val: PackedDataset, between_batches=None) -> float:
        """Summed task losses over the first trainer.eval_samples rows of one split.

        Objective randomness is keyed by sample id, so evaluation sees the same masks and
        spans every time; ids are offset past any training id.
        """
        world, mb = self.world, self.t.micro_batch_size
        rows = list(range(world.dp_rank, min(self.t.eval_samples, len(val)), world.dp_size))
        # Sharded layouts run every forward collectively: every rank takes the same number
        # of micro-batches, padding with unscored rows.
        per_rank = -(-min(self.t.eval_samples, len(val)) // world.dp_size)
        rows += [-1] * (per_rank - len(rows))
        totals: dict[str, torch.Tensor] = {}
        for i in range(0, len(rows), mb):
            chunk = rows[i : i + mb]
            real = torch.tensor([r >= 0 for r in chunk])
            batch = val.gather_batch([max(r, 0) for r in chunk])
            batch["sample_ids"] = torch.tensor(chunk, dtype=torch.int64) + EVAL_ID_OFFSET
            inputs, labels = split_batch(self.data.objective(batch))
            labels = {
                k: torch.where(_rows_mask(real, v), v, IGNORE_INDEX)
                for k, v in self._with_distill_labels(inputs, labels).items()
            }
            inputs = with_chunked_labels(inputs, labels, self.t.loss_chunk_tokens)
            sums, counts = self.engine.evaluate(inputs, labels), target_counts(labels)
            for k in sums:
                pair = torch.tensor([float(sums[k]), float(counts[k])], dtype=torch.float64)
                totals[k] = totals.get(k, torch.zeros(2, dtype=torch.float64)) + pair
            if between_batches is not None:
                between_batches()
        keys = sorted(totals)
        reduced = [dist.dp_sum(totals[k], world) for k in keys]
        means = [
            task_weight(k, self.job.model, self.job.distill) * t[0] / t[1].clamp(min=1)
            for k, t in zip(keys, reduced, strict=True)
        ]
        return float(sum(means))

    def fit(self) -> dict:
        """Train from start_step to max_steps, or until a stop is agreed (a signal, the time
        limit); returns a summary of the last step with the `reason` it ended (done,
        preempted, time_limit) after writing the exit state."""
        t, world = self.t, self.world
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.job))
        metrics = MetricsLogger(
            self.run_dir,
            enabled=world.is_main,
            tensorboard=t.tensorboard,
            max_steps=t.max_steps,
            start_step=self.start_step,
        )
        throughput = Throughput(
            flops_per_token=self.flops_per_token, peak_flops_total=peak_flops_total(self.job, world)
        )
        summary: dict = {"step": self.start_step}
        if self.start_step >= t.max_steps:
            log_rank0(
                "nothing to do: resumed at step %d >= trainer.max_steps=%d",
                self.start_step,
                t.max_steps,
            )
        watchdog = None
        if t.hang_timeout_s != 0:
            watchdog = Watchdog(
                self.run_dir,
                rank=world.rank,
                timeout_s=t.hang_timeout_s,
                on_hang=lambda why: self._write_exit_state("failed", None, error=why),
            ).start()
        self.stop.install()
        try:
            summary = self._loop(metrics, throughput, summary, watchdog)
        finally:
            self.stop.uninstall()
            if watchdog is not None:
                watchdog.close()
            metrics.close()
            self.data.loader.close()  # its worker processes, if any, end with the run
        dist.barrier(world)  # every rank's checkpoint shard is written
        self._write_exit_state(summary["reason"], summary["step"])
        return summary

    def _loop(self, metrics, throughput, summary: dict, watchdog: Watchdog | None) -> dict:
        t, world = self.t, self.world
        started = time.perf_counter()
        saved, longest = self.start_step, {"step": 0.0, "eval": 0.0, "save": 0.0}
        comm = CommAccounting(
            self.job,
            world,
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            start_step=self.start_step,
            run_dir=self.run_dir,
        )

        def save(step: int) -> None:
            nonlocal saved
            tick = time.perf_counter()
            with watchdog.paused_for() if watchdog else contextlib.nullcontext():
                self.save(step)
            longest["save"] = max(longest["save"], time.perf_counter() - tick)
            saved = step

        for step in range(self.start_step + 1, t.max_steps + 1):
            evaluates = t.eval_every and (step % t.eval_every == 0 or step == t.max_steps)
            lead = longest["step"] + longest["save"] + (longest["eval"] if evaluates else 0.0)
            reason = self._agreed_stop(lead_s=lead, progressed=step > self.start_step + 1)
            if reason is not None:
                return self._stopped(reason, step - 1, summary, saved=saved, save=save)
            logs = step % t.log_every == 0 or step == t.max_steps
            saves = (t.save_every and step % t.save_every == 0) or step == t.max_steps
            tick = time.perf_counter()
            with comm.count(step):  # one step of the run: bytes per collective and axis
                record = self.train_step(step - 1)
            if logs or evaluates or saves:
                # Steps queue work on a GPU without waiting for it; reading the results
                # waits for the queue, which is time these steps took (tokens/s, MFU).
                record = host_values(record)
            seconds = time.perf_counter() - tick
            longest["step"] = max(longest["step"], seconds)
            throughput.add(t.global_batch_size * self.seq_len, seconds)
            if step == self.start_step + 1:
                dist.tighten_timeout(world, self.job.parallel.timeout_s)
            comm.report(step)
            if watchdog is not None:
                watchdog.beat(seconds)
            summary = {"step": step, **record}
            if logs:
                self._log(metrics, throughput, summary, elapsed=time.perf_counter() - started)
            if evaluates:
                tick = time.perf_counter()
                try:
                    val = self.evaluate(between_batches=lambda: self._between_eval(watchdog))
                except StopAgreed as stop:  # the evaluation is dropped, the step is kept
                    return self._stopped(stop.reason, step, summary, saved=saved, save=save)
                longest["eval"] = max(longest["eval"], time.perf_counter() - tick)
                summary["val_loss"] = val["val_loss"]
                metrics.write(
                    {"step": step, **val, "val_ppl": math.exp(min(val["val_loss"], 50.0))}
                )
                log_rank0("step %d | val loss %.4f", step, val["val_loss"])
            if saves:
                save(step)
        return host_values({**summary, "reason": "done"})

    def _between_eval(self, watchdog: Watchdog | None) -> None:
        if watchdog is not None:
            watchdog.beat()
        # Signals only: the deadline was weighed before the step, this evaluation included.
        reason = self._agreed_stop(deadline=False)
        if reason is not None:
            raise StopAgreed(reason)

    def _agreed_stop(self, **when) -> str | None:
        """A reason to stop that some rank has, the same on every rank (collective); `when`
        as for StopRequest.local_reason."""
        return self.stop.agreed(lambda v: dist.max_over_ranks(v, self.world), **when)

    def _stopped(self, reason: str, step: int, summary: dict, *, saved: int, save) -> dict:
        """Stop after `step`: every rank saves it (unless just saved), then the caller
        writes the exit state."""
        log_rank0("stopping at step %d: %s", step, reason)
        if step > saved:
            save(step)
        return host_values({**summary, "step": step, "reason": reason})

    def _write_exit_state(self, reason: str, step: int | None, *, error: str | None = None):
        if self.world.is_main or reason == "failed":
            write_exit_state(
                exit_state_path(self.run_dir), reason=reason, step=step, env=self.env, error=error
            )

    def _moe_telemetry(self) -> tuple[dict, dict]:
        """The MoE layers' statistics since the last log, summed over every rank (each rank
        holds its pipeline stages' layers and routes its own tokens). Collective."""
        if not self.moe:
            return {}, {}
        local = {name: layer.stats.take() for name, layer in self.moe}
        summed: dict[str, torch.Tensor] = {}
        for part in dist.gather_objects(local, self.world):
            for name, values in part.items():
                summed[name] = summed[name] + values if name in summed else values
        return moe_metrics(dict(sorted(summed.items())), reduce=self.job.model.moe.aux_loss_reduce)

    def _log(
        self, metrics: MetricsLogger, throughput: Throughput, summary: dict, *, elapsed: float
    ) -> None:
        tps, mfu, seconds_per_step = throughput.read()
        loader = self.data.loader
        record = {
            **host_values(summary),
            "tokens_per_s": tps,
            "mfu": mfu,
            "elapsed": elapsed,
            "epoch": loader.epoch,
            "consumed_samples": loader.consumed_samples,
            **({"epochs": loader.epochs()} if len(loader.datasets) > 1 else {}),
        }
        moe_record, histograms = self._moe_telemetry()
        record.update(moe_record)
        metrics.write(record, histograms=histograms)
        metrics.progress(record, seconds_per_step=seconds_per_step)


def _load_failure(exc: BaseException) -> str:
    """The first line of why a state did not load; for torch.distributed.checkpoint's
    collective error, the first failing rank's own exception."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
