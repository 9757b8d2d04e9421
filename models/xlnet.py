"""XLNet (Yang et al. 2019, "XLNet: Generalized Autoregressive Pretraining for Language
Understanding") on the Transformer-XL core (Dai et al. 2019, "Transformer-XL: Attentive
Language Models Beyond a Fixed-Length Context").

A stack of post-LN blocks (LayerNorm after each residual add): relative multi-head
attention, then the position-wise MLP. The attention has separate q, k, v, o projections
without biases, and scores of three terms, all scaled by 1/sqrt(head size):

    content   (q_i + u) . k_j                 u = r_w_bias, per layer and head
    position  (q_i + v) . W_r s(i - j)        v = r_r_bias; s: sinusoids of the distance
    segment   (q_i + b) . e[seg_i != seg_j]   b = r_s_bias; e = seg_embed (same / different)

s(d) holds sin(d w_c) then cos(d w_c) over d_model channels, w_c = 10000**(-2c / d_model);
each layer projects it with its own W_r (`r`). Distances beyond cfg.clamp_len share the
encoding of +-clamp_len. Only whether two tokens share a segment matters, never which.

Two streams (permutation LM): the content stream h starts from the token embeddings and may
always see its own position; the query stream g starts from a learned `mask_emb` at each
predicted position and sees the content of the positions that `perm_mask` allows, never its
own (one allowed no key at all, the first of a factorisation order without memory, gets a
zero attention output). Both use the same weights and the same keys (the content stream's);
only the query stream is scored. Without predicted positions only the content stream runs:
bidirectional under `perm_mask`, causal (Transformer-XL's language model) without it.

Segment memory (Transformer-XL): `mems[l]`, the inputs of layer l over the previous
segment, are put in front of that layer's keys and values; they take no gradient. With
`return_mems=True` the forward pass also returns the last cfg.mem_len inputs of every layer,
detached, for the next segment.

Module paths (`blocks.3.attn.r`, `blocks.3.mlp.fc_in`) follow Loom's naming; the output head
`lm_head` is tied to the token embedding `wte` and has its own bias (Hugging Face's
`lm_loss`). `models/hf/xlnet.py` maps them to and from XLNetLMHeadModel.

Shape legend (suffixes of tensor names):
    B  batch size
    T  tokens of the current segment
    M  memory positions (the previous segment's layer inputs)
    L  keys and values: M + T
    P  predicted positions (the query stream)
    Q  queries inside `XLNetAttention` (T for the content stream, P for the query stream)
    R  rows of the relative position table: the distances L - 1 down to -(T - 1), or down
       to 0 when attention is causal (no key lies after its query)
    D  model width, d_model
    H  attention heads (the local heads when the projections are tensor-parallel)
    K  head size
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import MLP, TiedOutputMixin, check_seq_len, head_outputs, init_normal_
from models.config import ModelConfig
from models.t5 import masked_bias

__all__ = [
    "Stream",
    "XLNet",
    "XLNetAttention",
    "XLNetBlock",
    "relative_sinusoids",
]


def relative_sinusoids(distances_R: torch.Tensor, d_model: int, *, clamp_len: int) -> torch.Tensor:
    """(R, D) float32 encodings of the distances: sin(d w_c) in channel c and cos(d w_c) in
    channel D/2 + c, w_c = 10000**(-2c / D); |d| > clamp_len (when >= 1) counts as clamp_len."""
    d_R = distances_R.float()
    if clamp_len > 0:
        d_R = d_R.clamp(-clamp_len, clamp_len)
    exponent = torch.arange(0, d_model, 2, device=d_R.device, dtype=torch.float32) / d_model
    angles_RC = d_R[:, None] * 10000.0**-exponent
    return torch.cat([angles_RC.sin(), angles_RC.cos()], dim=-1)


class Stream(NamedTuple):
    """What one stream's attention needs beside the hidden states, the same in every layer."""

    index: torch.Tensor
    """Row of the position table for each (query, key): (Q, L), or (B, 1, Q, L)."""
    allowed: torch.Tensor | None
    """bool (B, 1, Q, L), True where the query may attend the key; None: everywhere."""
    segment_diff: torch.Tensor | None
    """bool (B, 1, Q, L), True where query and key lie in different segments; None: no
    segment term (no token_type_ids)."""
    has_key: torch.Tensor | None
    """bool (B, 1, Q, 1): False for a query allowed no key at all, whose attention output is
    then zero; None: every query has one."""


class XLNetAttention(nn.Module):
    """Relative multi-head attention of one layer (module docstring), for either stream.

    `keys` projects the keys, values and position keys once per layer; `forward` attends
    one stream's queries over them. The scores' position and segment terms are added to
    the content scores as the attention bias of `F.scaled_dot_product_attention`.
    """

    def __init__(self, d_model: int, n_head: int, head_dim: int, *, dropout: float = 0.0):
        super().__init__()
        self.head_dim, self.dropout = head_dim, dropout
        inner = n_head * head_dim
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.r = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, head_dim))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, head_dim))
        self.r_s_bias = nn.Parameter(torch.empty(n_head, head_dim))
        # Row 0: query and key in the same segment; row 1: in different ones.
        self.seg_embed = nn.Parameter(torch.empty(2, n_head, head_dim))

    def _heads(self, x_BQI: torch.Tensor) -> torch.Tensor:
        # -1 heads: a column-sharded (tensor-parallel) projection holds only its local heads.
        b, q, _ = x_BQI.shape
        return x_BQI.view(b, q, -1, self.head_dim).transpose(1, 2)

    def keys(
        self, h_BTD: torch.Tensor, mem_BMD: torch.Tensor | None, pos_RD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_BHLK, v_BHLK, r_HRK): content keys and values of memory and segment, and the
        projected position encodings (once for the whole batch)."""
        r_RI = self.r(pos_RD)
        r_HRK = r_RI.view(r_RI.shape[0], -1, self.head_dim).transpose(0, 1)
        k_BHLK, v_BHLK = self._heads(self.k(h_BTD)), self._heads(self.v(h_BTD))
        if mem_BMD is not None:
            # Projected apart: the memory takes no gradient, so backward skips its rows.
            k_BHLK = torch.cat([self._heads(self.k(mem_BMD)), k_BHLK], dim=2)
            v_BHLK = torch.cat([self._heads(self.v(mem_BMD)), v_BHLK], dim=2)
        return k_BHLK, v_BHLK, r_HRK

    def forward(
        self,
        x_BQD: torch.Tensor,
        keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        stream: Stream,
    ) -> torch.Tensor:
        """Attention output (B, Q, D) of the queries `x_BQD` over what `keys` returned."""
        k_BHLK, v_BHLK, r_HRK = keys
        q_BHQK = self._heads(self.q(x_BQD))
        b, h, q, _ = q_BHQK.shape
        l = k_BHLK.shape[2]
        scale = self.head_dim**-0.5

        def biased(bias_HK: torch.Tensor) -> torch.Tensor:
            # In the queries' dtype, so that autocast's half-precision q stays half.
            return q_BHQK + bias_HK[:, None].to(q_BHQK.dtype)

        position_BHQR = biased(self.r_r_bias) @ r_HRK.transpose(1, 2)
        bias_BHQL = position_BHQR.gather(-1, stream.index.expand(b, h, q, l))
        if stream.segment_diff is not None:
            segment_BHQ2 = torch.einsum("bhqk,shk->bhqs", biased(self.r_s_bias), self.seg_embed)
            bias_BHQL = bias_BHQL + torch.where(
                stream.segment_diff, segment_BHQ2[..., 1:], segment_BHQ2[..., :1]
            )
        bias_BHQL = masked_bias(bias_BHQL * scale, stream.allowed, q_BHQK.dtype)
        y_BHQK = F.scaled_dot_product_attention(
            biased(self.r_w_bias),
            k_BHLK,
            v_BHLK,
            attn_mask=bias_BHQL,
            dropout_p=self.dropout if self.training else 0.0,
            scale=scale,
        )
        if stream.has_key is not None:
            y_BHQK = y_BHQK * stream.has_key
        return self.o(y_BHQK.transpose(1, 2).reshape(b, q, -1))


class XLNetBlock(nn.Module):
    """Post-LN residual branches, applied to each stream with the same weights:

    x = ln_attn(x + drop(attn(x, keys of [memory; h])))
    x = ln_mlp(x + mlp(x))                               the MLP drops its own output
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.attn = XLNetAttention(d, cfg.n_head, cfg.head_dim, dropout=cfg.dropout)
        self.ln_attn = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, cfg.ffn_size, dropout=cfg.dropout, bias=True, activation=cfg.activation)
        self.ln_mlp = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(cfg.dropout)

    def _branches(self, x_BQD: torch.Tensor, attended_BQD: torch.Tensor) -> torch.Tensor:
        x_BQD = self.ln_attn(x_BQD + self.drop(attended_BQD))
        return self.ln_mlp(x_BQD + self.mlp(x_BQD))

    def forward(
        self,
        h_BTD: torch.Tensor,
        *,
        pos_RD: torch.Tensor,
        content: Stream,
        mem_BMD: torch.Tensor | None = None,
        g_BPD: torch.Tensor | None = None,
        query: Stream | None = None,
        content_out: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, g) after this layer. With `content_out=False` only the query stream is
        updated (the last layer's content output feeds nothing) and h comes back as is."""
        keys = self.attn.keys(h_BTD, mem_BMD, pos_RD)
        if g_BPD is not None:
            g_BPD = self._branches(g_BPD, self.attn(g_BPD, keys, query))
        if content_out:
            h_BTD = self._branches(h_BTD, self.attn(h_BTD, keys, content))
        return h_BTD, g_BPD


def _shape(name: str, x: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {shape}")


class XLNet(TiedOutputMixin, nn.Module):
    """Token embedding `wte`, the query stream's `mask_emb`, n_layer `XLNetBlock`s and the
    output head `lm_head` (tied to `wte` when cfg.tie_embeddings, with its own bias).

    The forward pass returns logits (or, given labels, the summed loss of each row); the
    loss belongs to the trainer.
    """

    pipeline_refusal = (
        "the query stream, the segment memory and the relative encodings pass through every "
        "layer beside the hidden states"
    )
    # Tokens per slice of the chunked loss (forward with `labels`); 0: the whole sequence.
    loss_chunk_tokens = 0
    # The causal path (Transformer-XL) reads neither the query stream's mask embedding nor
    # the segment terms: data parallelism must not wait for their gradients.
    may_leave_parameters_unused = True

    def __init__(self, cfg: ModelConfig, *, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.mask_emb = nn.Parameter(torch.empty(cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        # Keyed by layer index, as every family's blocks.
        self.blocks = nn.ModuleDict({str(i): XLNetBlock(cfg) for i in range(cfg.n_layer)})
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=True)
        # Segment memory the model keeps between training steps, by memory slot (`forward`'s
        # memory_slot): n_layer tensors (B, M, D) each. Not a buffer: the trainer saves it
        # with the checkpoint's per-rank files (`memory_state`, `load_memory_state`).
        self.memory: dict[int, list[torch.Tensor]] = {}
        self.tie_weights()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """XLNet's initialisation: every weight, the attention biases, the segment encodings
        and `mask_emb` ~ N(0, init_std); linear biases 0; LayerNorms 1 and 0. A no-op on the
        meta device, so call it again after `to_empty`."""
        std = self.cfg.init_std
        init_normal_(self, std)
        nn.init.normal_(self.mask_emb, std=std)
        for block in self.blocks.values():
            a = block.attn
            for p in (a.r_w_bias, a.r_r_bias, a.r_s_bias, a.seg_embed):
                nn.init.normal_(p, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        perm_mask: torch.Tensor | None = None,
        target_positions: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mems: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        return_mems: bool = False,
        memory_slot: int | None = None,
    ):
        """Logits of token ids (B, T): (B, P, V) of the query stream at `target_positions`
        (B, P), in their order; without them (B, T, V) of the content stream.

        `perm_mask` bool (B, T, T): True where query position i must not see the content of
        position j (Hugging Face's 1). The content stream sees its own position whatever it
        says; the query stream never does. Without perm_mask and target_positions the
        attention is causal. `token_type_ids` (B, T): segment ids, memory counting as 0.
        `attention_mask` (B, T): True for real tokens; padded keys get no weight. `attn_mask`
        bool (B, 1, T, T) or (B, T, T): True where query i may see key j (the clm objective's
        document mask; memory then counts as the row's first document). `position_ids` come
        with it and are not used: within a document a distance is the same counted from the
        row or the document start. `mems`: n_layer tensors (B, M, D), the previous segment's
        layer inputs, used without gradient.

        With `labels` ((B, P), or (B, T) without target_positions) the logits are not
        returned but scored a slice at a time: {"row_losses": (B,) summed cross-entropy}.
        With `return_mems` the result is (outputs, new mems), cfg.mem_len positions or fewer.

        `memory_slot` (training with memory carried between steps): the model reads the
        memory it keeps under that slot (none the first time), and keeps the new memory
        there for the slot's next segment; the rows of a slot must continue its previous
        rows (the loader's segment streams).
        """
        if memory_slot is not None:
            if mems is not None or return_mems or self.cfg.mem_len <= 0:
                raise ValueError(
                    "memory_slot keeps the memory in the model: give no mems or return_mems, "
                    "and set model.mem_len > 0"
                )
            # forward, not __call__: the module's hooks (FSDP's) already ran for this call.
            outputs, self.memory[memory_slot] = self.forward(
                input_ids,
                perm_mask=perm_mask,
                target_positions=target_positions,
                token_type_ids=token_type_ids,
                attention_mask=attention_mask,
                attn_mask=attn_mask,
                position_ids=position_ids,
                mems=self.memory.get(memory_slot),
                labels=labels,
                return_mems=True,
            )
            return outputs
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        check_seq_len(t, self.cfg.max_seq_len)
        if return_mems and self.cfg.mem_len <= 0:
            raise ValueError("return_mems=True needs model.mem_len > 0 (positions to keep)")
        masks = {
            "perm_mask": perm_mask,
            "target_positions": target_positions,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "attn_mask": attn_mask,
        }
        _check_inputs(b, t, position_ids=position_ids, **masks)
        mems = self._check_mems(mems, b)
        m = 0 if mems is None else mems[0].shape[1]
        pos_RD, content, query = self._streams(b, t, m, **masks)
        h_BTD = self.drop(self.wte(input_ids))
        pos_RD = self.drop(pos_RD.to(h_BTD.dtype))
        g_BPD = None
        if target_positions is not None:
            g_BPD = self.drop(self.mask_emb.to(h_BTD.dtype).expand(b, query.index.shape[2], -1))
        new_mems, last = [], len(self.blocks) - 1
        for i, block in enumerate(self.blocks.values()):
            mem_BMD = None if mems is None else mems[i]
            if return_mems:
                new_mems.append(self._cache(h_BTD, mem_BMD))
            h_BTD, g_BPD = block(
                h_BTD,
                pos_RD=pos_RD,
                content=content,
                mem_BMD=mem_BMD,
                g_BPD=g_BPD,
                query=query,
                content_out=g_BPD is None or i < last,
            )
        y_BQD = self.drop(h_BTD if g_BPD is None else g_BPD)
        if labels is not None:
            _shape("labels", labels, tuple(y_BQD.shape[:2]))
        outputs = head_outputs(self.lm_head, y_BQD, labels, chunk_tokens=self.loss_chunk_tokens)
        return (outputs, new_mems) if return_mems else outputs

    def memory_state(self) -> dict[int, list[torch.Tensor]]:
        """The kept memory by slot, on the CPU (for a checkpoint)."""
        return {slot: [m.cpu() for m in mems] for slot, mems in self.memory.items()}

    def load_memory_state(self, state: dict[int, list[torch.Tensor]]) -> None:
        """Keep `state` (by slot, as `memory_state` gives it) on this model's device."""
        device = self.wte.weight.device
        self.memory = {slot: [m.to(device) for m in mems] for slot, mems in state.items()}

    def _cache(self, h_BTD: torch.Tensor, mem_BMD: torch.Tensor | None) -> torch.Tensor:
        """The next segment's memory of one layer: its last mem_len inputs, detached."""
        cat_BLD = h_BTD if mem_BMD is None else torch.cat([mem_BMD, h_BTD], dim=1)
        return cat_BLD[:, -self.cfg.mem_len :].detach()

    def _check_mems(self, mems: list[torch.Tensor] | None, b: int) -> list[torch.Tensor] | None:
        """The memory, detached (it takes no gradient), or None when there is none."""
        if not mems:
            return None
        if len(mems) != len(self.blocks):
            raise ValueError(f"mems holds {len(mems)} tensors; expected one per layer")
        m = mems[0].shape[1]
        for i, mem in enumerate(mems):
            _shape(f"mems[{i}]", mem, (b, m, self.cfg.d_model))
        return [mem.detach() for mem in mems]

    def _streams(
        self,
        b: int,
        t: int,
        m: int,
        *,
        perm_mask: torch.Tensor | None,
        target_positions: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Stream, Stream | None]:
        """The position encodings and what each stream's attention needs (`Stream`)."""
        device, l = self.wte.weight.device, m + t
        causal = perm_mask is None and target_positions is None
        rows = l if causal else l + t - 1
        pos_RD = relative_sinusoids(
            torch.arange(l - 1, l - 1 - rows, -1, device=device),
            self.cfg.d_model,
            clamp_len=self.cfg.clamp_len,
        )
        # Query i sits at M + i, key j at j: distance M + i - j is row j + T - 1 - i. A
        # causal table stops at distance 0; the later keys it cannot index are masked.
        i_T1 = torch.arange(t, device=device)[:, None]
        index_TL = (torch.arange(l, device=device)[None, :] + t - 1 - i_T1).clamp(max=rows - 1)
        seen_BTT = _visible(
            b,
            t,
            perm_mask=perm_mask,
            causal=causal,
            attention_mask=attention_mask,
            attn_mask=attn_mask,
            device=device,
        )
        # Memory continues the row's first document; without a document mask all of it is seen.
        mem_BTM = (
            None if attn_mask is None else _doc_mask(attn_mask, b, t)[:, :, :1].expand(b, t, m)
        )
        diff_BTL = None
        if token_type_ids is not None:
            keys_BL = F.pad(token_type_ids, (m, 0))  # memory counts as segment 0
            diff_BTL = token_type_ids[:, :, None] != keys_BL[:, None, :]
        own_TT = torch.eye(t, dtype=torch.bool, device=device)
        allowed = None
        if seen_BTT is not None:
            allowed = _with_memory(seen_BTT | own_TT, mem_BTM, m)[:, None]
        content = Stream(index_TL, allowed, _unsqueeze(diff_BTL), None)
        if target_positions is None:
            return pos_RD, content, None
        query = _query_stream(target_positions.long(), index_TL, seen_BTT, mem_BTM, diff_BTL, m=m)
        return pos_RD, content, query


def _query_stream(target_BP, index_TL, seen_BTT, mem_BTM, diff_BTL, *, m: int) -> Stream:
    """The query stream's rows: the content stream's rows of its positions (before a
    position's own column is opened), without their own content."""
    (b, p), t = target_BP.shape, index_TL.shape[0]

    def pick(x_BTX: torch.Tensor) -> torch.Tensor:
        """Rows target_BP of x: (B or 1, T, X) -> (B, P, X)."""
        x_BTX = x_BTX.expand(b, t, x_BTX.shape[-1])
        return x_BTX.gather(1, target_BP[:, :, None].expand(b, p, x_BTX.shape[-1]))

    own_BPT = torch.arange(t, device=target_BP.device) == target_BP[:, :, None]
    seen_BPT = ~own_BPT if seen_BTT is None else pick(seen_BTT) & ~own_BPT
    allowed_BPL = _with_memory(seen_BPT, None if mem_BTM is None else pick(mem_BTM), m)
    has_key_BP1 = allowed_BPL.any(-1, keepdim=True)
    # A query with no key attends uniformly to all, and its output is then zeroed.
    allowed_BPL = allowed_BPL | ~has_key_BP1
    diff_BPL = None if diff_BTL is None else pick(diff_BTL)
    return Stream(
        pick(index_TL[None])[:, None],
        allowed_BPL[:, None],
        _unsqueeze(diff_BPL),
        has_key_BP1[:, None],
    )


def _unsqueeze(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x[:, None]


def _doc_mask(attn_mask: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return attn_mask.bool().reshape(b, t, t)


def _check_inputs(
    b: int,
    t: int,
    *,
    perm_mask: torch.Tensor | None,
    target_positions: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> None:
    """ValueError naming the first input of the wrong shape, or position_ids without the
    document mask they belong to."""
    _shape("perm_mask", perm_mask, (b, t, t))
    for name, x in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
        _shape(name, x, (b, t))
    if target_positions is not None and (
        target_positions.dim() != 2 or target_positions.shape[0] != b
    ):
        raise ValueError(
            f"target_positions must be (batch, predicted), got {tuple(target_positions.shape)}"
        )
    if attn_mask is not None and tuple(attn_mask.shape) not in ((b, 1, t, t), (b, t, t)):
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}; expected {(b, 1, t, t)}")
    if position_ids is not None and attn_mask is None:
        raise ValueError(
            "position_ids are only accepted with the document mask attn_mask: XLNet's "
            "attention is relative, so positions restarting at document starts mean nothing "
            "unless attention stays inside documents"
        )


def _visible(
    b: int,
    t: int,
    *,
    perm_mask: torch.Tensor | None,
    causal: bool,
    attention_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """bool (B or 1, T, T): whether query i may see the content of key j of the segment
    (before the content stream's rule that a position always sees itself); None: all."""
    seen = None
    if perm_mask is not None:
        seen = ~perm_mask.bool()
    elif causal:
        seen = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]
    if attention_mask is not None:
        real_B1T = attention_mask.bool()[:, None, :]
        seen = real_B1T if seen is None else seen & real_B1T
    if attn_mask is not None:
        doc_BTT = _doc_mask(attn_mask, b, t)
        seen = doc_BTT if seen is None else seen & doc_BTT
    return seen


def _with_memory(seen_BQT: torch.Tensor, mem_BQM: torch.Tensor | None, m: int) -> torch.Tensor:
    """(B, Q, M + T): memory columns (all seen unless `mem_BQM` says) before the segment's."""
    if m == 0:
        return seen_BQT
    if mem_BQM is None:
        mem_BQM = seen_BQT.new_ones(*seen_BQT.shape[:-1], m)
    return torch.cat([mem_BQM.expand(seen_BQT.shape[0], -1, -1), seen_BQT], dim=-1)
