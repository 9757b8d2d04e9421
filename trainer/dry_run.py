"""`trainer.dry_run=true`: build the model on the meta device and report its size and cost.

No weight is allocated, so `+model=gpt3_175b` works on a laptop. The per-rank memory
estimate assumes Loom's mixed-precision layout (fp32 parameters, fp32 gradients, two fp32
optimizer moments: 16 bytes per parameter), divided by TP x PP, with the ZeRO stage
sharding optimizer states (1), plus gradients (2), plus parameters (3) over data-parallel
ranks. Activations are what Loom's blocks keep for backward, counted tensor by tensor
(`layer_bytes`, checked against the bytes a forward pass on the CPU holds): per token of
a self-attention block of width h and feed-forward width f, the residual stream at both
norms (fp32 under autocast: parameters are fp32), each norm's output as the next matmul
reads it, q, k, v, the attention output, both feed-forward activations, and a 1-byte mask
per residual dropout; an encoder-decoder's decoder layer adds cross-attention.
Selective checkpointing keeps only the block input and the matmul outputs, full only the
block input, each plus one block's full set while it is recomputed. Korthikanti et al.
2022 (eq. 2) count s*b*h*34 bytes for the same block in 16 bits throughout; Loom keeps a
few tensors more. Under TP the matmul outputs are split, the rest is not unless sequence
parallelism splits it too; the layers of one pipeline stage count with PP micro-batches
in flight (1F1B), and ELECTRA's two stacks both count. An MoE layer keeps its own set
in place of the dense MLP's (`moe_layer_bytes`, checked the same way): the router's
jittered input and probabilities, each expert's padded input and hidden activations (E x
capacity slots per row, so capacity factor x top_k per token at most), the expert outputs
for the gate product and the slot indices. Without ZeRO-2/3, autocast's
16-bit copies of the weights are held from forward to backward (2 bytes a parameter).
The attention-score matrix (5*a*s/h in eq. 2), which fused SDPA kernels do not store, is
reported separately as an upper bound (and counted in the total for attention that
computes its scores explicitly: NEZHA's).
Communication per rank and step, by mesh axis and collective, follows the formula of
parallel/comm_model.py (which a distributed run's comm.json checks against a measured step),
with the bytes a rank sends over ring links beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.log import log_rank0
from data_pipeline.objectives import target_length
from models import build_model, param_counts
from models.config import SEQ2SEQ_FAMILIES, MoeConfig
from parallel.comm import CommTally, summary_lines
from parallel.comm_model import expected_comm
from trainer.comm_report import job_comm_layout
from trainer.config import JobConfig
from trainer.distill import teacher_config, teacher_forward_flops
from trainer.metrics import job_flops_per_token

_GIB = 1024**3


def resolve_vocab(job: JobConfig) -> int:
    """Embedding rows the job would allocate, without preparing any data."""
    vocab = job.model.vocab_size
    if vocab is None and job.data.path is not None:
        manifest = Path(job.data.path) / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"data.path={job.data.path!r} has no manifest.json")
        vocab = int(json.loads(manifest.read_text())["vocab_size"])
    if vocab is None and job.data.tokenizer == "byte":
        from data_pipeline.tokenizers import ByteTokenizer

        vocab = ByteTokenizer().vocab_size
    if vocab is None:
        raise ValueError("model.vocab_size is null: set it (or data.path) for a dry run")
    return job.model.padded_vocab_size(vocab)


def memory_estimate(
    job: JobConfig, *, params: int, vocab: int, world_size: int, expert_params: int = 0
) -> dict:
    """Bytes per rank: model states, activations (with and without scores), logits.

    Expert weights are split over `parallel.ep` (and ZeRO shards them over the dp / ep
    ranks that hold the same experts); the other weights over TP, and ZeRO over all of dp.
    """
    m, p, t = job.model, job.parallel, job.trainer
    dp = p.data_parallel_size(world_size)
    dense = (params - expert_params) / (p.tp * p.pp)
    experts = expert_params / (p.ep * p.pp)

    def state(bytes_per_param: float, zero_stage: int) -> float:
        """One kind of model state; ZeRO from `zero_stage` on shards it over data parallel."""
        if p.zero < zero_stage:
            return bytes_per_param * (dense + experts)
        return bytes_per_param * (dense / dp + experts / (dp // p.ep))

    weights, grads, moments = state(4, 3), state(4, 2), state(8, 1)
    s, b = job.data.seq_len or m.max_seq_len, t.micro_batch_size
    low = job.precision.dtype != "fp32"
    fsdp = p.zero >= 2 and p.engine == "native"  # FSDP2 computes with 16-bit parameters
    decoder = (m.n_decoder_layer or m.n_layer) if m.family in SEQ2SEQ_FAMILIES else 0
    layers = (m.n_layer + decoder) / p.pp
    in_flight = min(p.pp, max(1, t.global_batch_size // (t.micro_batch_size * dp)))
    # (width, heads, feed-forward width) of each stack: ELECTRA's generator is a second one.
    stacks = [(m.d_model, m.n_head, m.ffn_size)]
    if m.family == "electra":
        gen = m.generator_config()
        stacks.append((gen.d_model, gen.n_head, gen.ffn_size))
    mode = p.activation_checkpointing
    act = 2 if low else 4  # bytes of an activation value
    shape = dict(
        act=act,
        residual=2 if low and fsdp else 4,
        dropout=m.dropout > 0,
        tp=p.tp,
        sp=p.sp,
    )
    moe_layers = len(m.moe.layer_ids(m.n_layer))
    moe_layers += len(m.moe.layer_ids(decoder)) if decoder else 0
    base = 0.0
    for i, (h, _, f) in enumerate(stacks):
        held = m.n_layer * layer_bytes(h, f, mode=mode, **shape)
        held += decoder * layer_bytes(h, f, mode=mode, cross=True, **shape)
        working = layer_bytes(h, f, mode="none", cross=decoder > 0, **shape)
        if moe_layers and i == 0:  # the experts are in the main stack (both of T5's)
            held += moe_layers * moe_layer_bytes(h, f, m.moe, seq_len=s, mode=mode, act=act)
            working += moe_layer_bytes(h, f, m.moe, seq_len=s, mode="none", act=act)
        base += s * b * (held / p.pp * in_flight + (working if mode != "none" else 0))
    # Autocast's 16-bit copies of the weights, held for backward by the matmuls that read
    # them; recomputed blocks make theirs again (the output layer's stays).
    copies = 0.0
    if low and not fsdp:
        # Recomputed blocks leave only the output projection (vocabulary x width) held.
        held_params = dense + experts if mode == "none" else vocab * m.d_model / p.tp
        copies = 2 * held_params
    scores = sum(act / 2 * s * b * 5 * a * s / p.tp * layers * in_flight for _, a, _ in stacks)
    explicit = m.position == "relative_sinusoidal"
    logits = _logits_bytes(job, vocab=vocab, seq_len=s)
    states = weights + grads + moments
    return {
        "data_parallel": dp,
        "weights_gib": weights / _GIB,
        "grads_gib": grads / _GIB,
        "optimizer_gib": moments / _GIB,
        "activations_gib": base / _GIB,
        "weight_copies_gib": copies / _GIB,
        "attention_scores_gib": scores / _GIB,
        "logits_gib": logits / _GIB,
        # Attention with explicit scores (NEZHA's relative positions) keeps them.
        "total_gib": (states + base + copies + logits + (scores if explicit else 0)) / _GIB,
        "total_with_scores_gib": (states + base + copies + scores + logits) / _GIB,
    }


def layer_bytes(
    h: int,
    f: int,
    *,
    mode: str,
    act: int,
    residual: int,
    dropout: bool,
    tp: int = 1,
    sp: bool = False,
    cross: bool = False,
) -> float:
    """Bytes per token one block keeps for backward (module docstring): `act` bytes per
    activation value (2 in bf16/fp16, 4 in fp32), `residual` per value of the residual
    stream. Values split over TP: q, k, v, the attention output and the feed-forward
    activations; the rest is whole on every TP rank unless `sp`. `cross`: a decoder
    layer's cross-attention too (its norm, q, the memory's k and v, its output)."""
    whole = tp if sp else 1
    if mode == "full":
        return residual * h / whole
    if mode == "selective":  # the input and every matmul output
        kept = act * (4 * h + f) / tp + (residual * h + act * 2 * h) / whole
        if cross:
            kept += act * 4 * h / tp + act * h / whole
        return kept
    kept = act * (4 * h + 2 * f) / tp + (2 * residual * h + 2 * act * h) / whole
    kept += 2 * h / whole if dropout else 0  # one-byte masks of the two residual dropouts
    if cross:
        kept += act * 4 * h / tp + (residual * h + act * h + (h if dropout else 0)) / whole
    return kept


def moe_layer_bytes(h: int, f: int, moe: MoeConfig, *, seq_len: int, mode: str, act: int) -> float:
    """Bytes per token an MoE layer keeps for backward beyond the dense block whose MLP it
    replaces, with `act` bytes per activation value. Each token has s expert slots: E x
    capacity / seq_len padded to capacity; sorted (dropless or unpadded) s = top_k, every
    choice taken as kept (an upper bound). Selective checkpointing keeps the router's
    logits and both expert products in place of the two MLP products; full, nothing more."""
    if mode == "full":
        return 0.0
    e, k = moe.num_experts, moe.top_k
    capacity = moe.padded_capacity(seq_len, training=True)
    s = k if capacity is None else e * capacity / seq_len
    if mode == "selective":
        return 4 * e + act * s * (f + h) - act * (f + h)
    # fp32 router: its input times the jitter (and the jitter), logits and probabilities
    # (the z-loss's and the softmax's), top-k gates and expert ids, the z-loss's logsumexp,
    # and with k > 1 the gates' sum that renormalises them.
    router = (8 if moe.jitter_eps > 0 else 4) * h + 8 * e + 12 * k + 4
    router += 4 * k + 4 if k > 1 else 0
    indices = 8 * s + 8 * k  # int64: the token of each slot, the slot of each choice
    experts = act * s * (h + 2 * f)  # each slot's input, hidden layer and activation
    combine = 4 * k * h  # expert outputs in fp32 for the gate product
    return router + indices + experts + combine - act * (h + 2 * f)


def _logits_bytes(job: JobConfig, *, vocab: int, seq_len: int) -> float:
    """fp32 logits and their gradient, for the tokens scored at once (trainer.loss_chunk_tokens),
    vocabulary-sharded under TP. ELECTRA's generator scores its masked positions only, with
    logits gathered whole under TP, and its sampling adds their fp32 probabilities and
    int64 cumulative sums. XLNet's permutation LM scores its predicted positions only."""
    m, t, tp = job.model, job.trainer, job.parallel.tp
    rows, per_value, split = seq_len * t.micro_batch_size, 2 * 4, tp
    if m.family == "electra":
        masked = max(1, round(job.data.mlm.mask_prob * (seq_len - 2)))
        rows, per_value, split = masked * t.micro_batch_size, 2 * 4 + 4 + 8, 1
    objective = job.data.objective or m.objective
    if m.family == "xlnet" and objective == "plm":  # the query stream's predicted positions
        rows = target_length(objective, cfg=job.data, seq_len=seq_len) * t.micro_batch_size
    scored = min(t.loss_chunk_tokens, rows) if t.loss_chunk_tokens > 0 else rows
    return per_value * scored * vocab / split


def comm_estimate(job: JobConfig, *, world_size: int, vocab: int, seq_len: int) -> dict:
    """{"volumes": {kind: {axis: {"bytes", "calls"}}} per rank and step, "shape": degree of
    each mesh axis}, or {"error": why} for a layout the formula does not describe."""
    if job.parallel.engine != "native":
        return {"error": f"the formula describes parallel.engine=native, not {job.parallel.engine}"}
    try:
        layout = job_comm_layout(job, world_size=world_size, vocab_size=vocab, seq_len=seq_len)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"volumes": expected_comm(layout).to_json(), "shape": layout.shape()}


def dry_run(job: JobConfig, *, world_size: int) -> dict:
    vocab = resolve_vocab(job)
    seq_len = job.data.seq_len or job.model.max_seq_len
    with torch.device("meta"):
        model = build_model(job.model, vocab_size=vocab)
    counts = param_counts(model)
    report = {
        "model": job.model.name,
        "family": job.model.family,
        "vocab_rows": vocab,
        "seq_len": seq_len,
        "params_total": counts["total"],
        "params_embedding": counts["embedding"],
        "params_non_embedding": counts["non_embedding"],
        "params_expert": counts["expert"],
        "params_active": counts["active"],
        "flops_per_token": job_flops_per_token(job, vocab_size=vocab, seq_len=seq_len),
        "world_size": world_size,
        "layout": {
            "tp": job.parallel.tp,
            "pp": job.parallel.pp,
            "ep": job.parallel.ep,
            "zero": job.parallel.zero,
            "micro_batch_size": job.trainer.micro_batch_size,
            "precision": job.precision.dtype,
        },
        "memory_per_rank": memory_estimate(
            job,
            params=counts["total"],
            vocab=vocab,
            world_size=world_size,
            expert_params=counts["expert"],
        ),
        "comm_per_rank": comm_estimate(job, world_size=world_size, vocab=vocab, seq_len=seq_len),
    }
    if job.distill.enabled:
        report["teacher"] = teacher_report(job, vocab=vocab, seq_len=seq_len, world_size=world_size)
    out = Path(job.trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dry_run.json").write_text(json.dumps(report, indent=1) + "\n")
    _print(report, out / "dry_run.json")
    return report


def teacher_report(job: JobConfig, *, vocab: int, seq_len: int, world_size: int) -> dict:
    """The distillation teacher's size, forward FLOPs per token (counted apart from the
    student's training FLOPs) and weights per rank (fp32; sharded over data parallel under
    ZeRO-3, whole otherwise), from its config alone."""
    cfg = teacher_config(job.distill.teacher)
    rows = cfg.padded_vocab_size(cfg.vocab_size or vocab)
    with torch.device("meta"):
        params = param_counts(build_model(cfg, vocab_size=rows))["total"]
    dp = job.parallel.data_parallel_size(world_size)
    shards = dp if job.parallel.zero == 3 else 1
    return {
        "model": cfg.name,
        "params_total": params,
        "forward_flops_per_token": teacher_forward_flops(cfg, vocab_size=rows, seq_len=seq_len),
        "weights_gib_per_rank": 4 * params / shards / _GIB,
    }


def _print(r: dict, path: Path) -> None:
    mem = r["memory_per_rank"]
    log_rank0(
        "dry run of %s (%s), vocab rows %d, seq_len %d",
        r["model"],
        r["family"],
        r["vocab_rows"],
        r["seq_len"],
    )
    log_rank0(
        "parameters: %s total, %s embedding, %s non-embedding",
        f"{r['params_total']:,}",
        f"{r['params_embedding']:,}",
        f"{r['params_non_embedding']:,}",
    )
    if r["params_expert"]:
        log_rank0(
            "mixture of experts: %s expert parameters; %s active per token",
            f"{r['params_expert']:,}",
            f"{r['params_active']:,}",
        )
    log_rank0("training FLOPs per token (active parameters): %.4g", r["flops_per_token"])
    log_rank0(
        "memory per rank (GiB): weights %.2f, grads %.2f, optimizer %.2f, activations "
        "%.2f, 16-bit weight copies %.2f (+%.2f attention scores without fused attention), "
        "logits %.2f, total %.2f",
        mem["weights_gib"],
        mem["grads_gib"],
        mem["optimizer_gib"],
        mem["activations_gib"],
        mem["weight_copies_gib"],
        mem["attention_scores_gib"],
        mem["logits_gib"],
        mem["total_gib"],
    )
    _print_comm(r["comm_per_rank"])
    if "teacher" in r:
        t = r["teacher"]
        log_rank0(
            "distillation teacher %s: %s parameters, forward FLOPs per token %.4g, weights "
            "per rank %.2f GiB",
            t["model"],
            f"{t['params_total']:,}",
            t["forward_flops_per_token"],
            t["weights_gib_per_rank"],
        )
    log_rank0("written to %s", path)


def _print_comm(comm: dict) -> None:
    if "error" in comm:
        log_rank0("communication: not estimated (%s)", comm["error"])
        return
    lines = summary_lines(CommTally.from_json(comm["volumes"]), shape=comm["shape"])
    log_rank0("communication per rank and step (formula)%s", ":" if lines else ": none")
    for line in lines:
        log_rank0("  %s", line)
