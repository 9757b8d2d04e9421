"""BERT-style bidirectional encoder with MLM and NSP/SOP heads; ALBERT and RoBERTa options.

BERT (Devlin et al. 2019): word + learned position + token-type embeddings, LayerNorm and
dropout, then `n_layer` post-LN blocks (`cfg.pre_ln=False`; pre-LN also works and adds a final
norm), then two heads: the masked-LM head (dense, activation, LayerNorm, and a decoder tied to
the word embeddings with its own output bias) on every position, and the sentence-pair head
(pooler dense + tanh on the [CLS] position, then a 2-way classifier) used by NSP and SOP.

StructBERT (Wang et al. 2019) is BERT with a 3-way pair classifier (`cfg.pair_classes=3`:
the second segment follows the first, precedes it, or comes from another document).

SpanBERT (Joshi et al. 2020) is RoBERTa's single-segment model (no pair head) with a span
boundary head (`cfg.sbo_max_targets` > 0, `SpanBoundaryHead`) trained by objective mlm_sbo.

RoBERTa (Liu et al. 2019) is this model without the sentence-pair head (`cfg.pair_head=False`:
its `mlm` objective has no pair task, so neither the pooler nor the classifier exists).

ALBERT (Lan et al. 2020): `cfg.embedding_size` = E < d_model factorises the embeddings (the
tables have width E, LayerNorm'ed in width E and projected E -> D by `emb_proj`; the MLM head
maps back to width E before its decoder) and `cfg.share_layers` applies one block's weights
`n_layer` times.

ELECTRA (Clark et al. 2020, models/electra.py) is built of two of these: a generator without
tables (`embeddings=False`) and a discriminator without the MLM head (`mlm_head=False`).

NEZHA (Wei et al. 2019) is BERT with `cfg.position="relative_sinusoidal"`: no position table;
every attention layer adds fixed sinusoids of the distance clip(j - i, -k, k) to its keys and
values (`models.blocks.RelativeSinusoidal`, k = `cfg.max_relative_position`).

Module names follow `models/gpt.py` where they mean the same thing (`wte`, `wpe`,
`blocks.N.attn.qkv`, ...), so tensor-parallel plans written for GPT blocks apply unchanged.

Shape legend (suffixes of tensor names):
    B  batch size
    T  sequence length (tokens)
    D  model width, d_model
    E  embedding width (cfg.embedding_size, or D)
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import (
    RelativeSinusoidal,
    RotaryEmbedding,
    TiedOutputMixin,
    TransformerBlock,
    block_from_config,
    check_seq_len,
    chunked_row_losses,
    init_normal_,
    make_norm,
    sequence_length,
)
from models.config import ModelConfig

__all__ = ["Bert", "SpanBoundaryHead", "combine_masks", "head_activation"]


def head_activation(name: str) -> nn.Module:
    """Activation of the MLM head's transform: the blocks' one, ungated (BERT uses one act)."""
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_tanh", "gated_gelu"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"model.activation={name!r} is unknown")


class SpanBoundaryHead(nn.Module):
    """SpanBERT's span boundary objective (Joshi et al. 2020, sec. 3.2): each masked token
    x_i of a span (s, e) is predicted from the encoder outputs of the boundary tokens
    x_{s-1}, x_{e+1} and an embedding p of its relative position i - s:
        h1 = LayerNorm(act(W1 [x_{s-1}; x_{e+1}; p])),  y = LayerNorm(act(W2 h1)),
    then the MLM head's output projection (tied to the word embeddings) gives the logits.
    Returns y (B, K, E) for K target slots per row; the positions are gathered first, so
    the head runs on the K (about 15% of T) slots, not on every token. SpanBERT's code
    sizes p at 200 and the table at its 15 --max-pair-targets rows (cfg.sbo_position_size,
    cfg.sbo_max_targets).
    """

    def __init__(self, cfg: ModelConfig, *, width: int):
        super().__init__()
        d, eps, p = cfg.d_model, cfg.layer_norm_eps, cfg.sbo_position_size
        self.position = nn.Embedding(cfg.sbo_max_targets, p)
        self.dense1 = nn.Linear(2 * d + p, d, bias=cfg.bias)
        self.ln1 = make_norm(cfg.norm, d, eps=eps, bias=cfg.bias)
        self.dense2 = nn.Linear(d, width, bias=cfg.bias)
        self.ln2 = make_norm(cfg.norm, width, eps=eps, bias=cfg.bias)
        self.act = head_activation(cfg.activation)

    def forward(
        self,
        x_BTD: torch.Tensor,
        left_BK: torch.Tensor,
        right_BK: torch.Tensor,
        pos_BK: torch.Tensor,
    ) -> torch.Tensor:
        d = x_BTD.shape[-1]
        left_BKD = torch.gather(x_BTD, 1, left_BK[..., None].expand(-1, -1, d))
        right_BKD = torch.gather(x_BTD, 1, right_BK[..., None].expand(-1, -1, d))
        h0_BKH = torch.cat([left_BKD, right_BKD, self.position(pos_BK)], dim=-1)
        h1_BKD = self.ln1(self.act(self.dense1(h0_BKH)))
        return self.ln2(self.act(self.dense2(h1_BKD)))


class Bert(TiedOutputMixin, nn.Module):
    """Encoder returning {"logits": (B, T, V) MLM logits, "nsp_logits": (B, C)}, C =
    `cfg.pair_classes` (2; StructBERT's next/previous/random: 3); without the pair head
    (`cfg.pair_head=False`) "nsp_logits" is left out.

    With `cfg.share_layers` the single block lives at `blocks.0` and runs `n_layer` times;
    pipeline stages cannot split such a model by blocks.
    """

    # Pipeline split: the first stage holds the embeddings, the last the final norm and both
    # heads; parameter-free modules (the rotary and relative tables) run on every stage.
    pipeline_first = ("wte", "wpe", "tte", "emb_ln", "emb_proj", "drop")
    pipeline_last = (
        "ln_f",
        "mlm_dense",
        "mlm_act",
        "mlm_ln",
        "lm_head",
        "pooler",
        "nsp_head",
        "sbo",
    )
    # Tokens per slice of the chunked MLM loss (forward with `labels`); 0: the whole sequence.
    loss_chunk_tokens = 0
    # Training-only outputs for distillation, set by the trainer: "hidden" adds
    # "hidden_states", "attention" adds "attention_scores" (see `forward`).
    distill_outputs: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab_size: int,
        embeddings: bool = True,
        mlm_head: bool = True,
    ):
        """`embeddings=False` builds no token, position or type table nor their LayerNorm
        (ELECTRA's generator reads its discriminator's): `forward` then takes embedded
        tokens (B, T, E). `mlm_head=False` builds no MLM head, and `forward` returns the
        encoder's hidden states (ELECTRA's discriminator has a head of its own)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = cfg.max_seq_len
        self._types_checked = False  # see _token_type_embedding
        d, eps = cfg.d_model, cfg.layer_norm_eps
        e = cfg.embedding_size if cfg.embedding_size is not None else d
        self.wte = self.wpe = self.tte = self.emb_ln = None
        if embeddings:
            self.wte = nn.Embedding(vocab_size, e)
            self.wpe = nn.Embedding(cfg.max_seq_len, e) if cfg.position == "learned" else None
            self.tte = nn.Embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size > 0 else None
            self.emb_ln = make_norm(cfg.norm, e, eps=eps, bias=cfg.bias)
        self.emb_proj = nn.Linear(e, d, bias=cfg.bias) if e != d else None
        self.drop = nn.Dropout(cfg.dropout)
        self.rotary = (
            RotaryEmbedding(cfg.head_dim, base=cfg.rotary_base)
            if cfg.position == "rotary"
            else None
        )
        # NEZHA: no position table; every layer adds fixed sinusoids of the clipped distance.
        self.relative = (
            RelativeSinusoidal(cfg.head_dim, max_relative_position=cfg.max_relative_position)
            if cfg.position == "relative_sinusoidal"
            else None
        )
        # A dict keyed by layer index keeps block names stable when a pipeline stage deletes
        # the blocks it does not own (as in GPT).
        n_blocks = 1 if cfg.share_layers else cfg.n_layer
        self.blocks = nn.ModuleDict(
            {str(i): block_from_config(cfg, index=i) for i in range(n_blocks)}
        )
        # Post-LN blocks end normalised; pre-LN ones need a final norm before the heads.
        self.ln_f = make_norm(cfg.norm, d, eps=eps, bias=cfg.bias) if cfg.pre_ln else None
        self.mlm_dense = self.mlm_act = self.mlm_ln = self.lm_head = None
        if mlm_head:
            self.mlm_dense = nn.Linear(d, e, bias=cfg.bias)
            self.mlm_act = head_activation(cfg.activation)
            self.mlm_ln = make_norm(cfg.norm, e, eps=eps, bias=cfg.bias)
            self.lm_head = nn.Linear(e, vocab_size, bias=cfg.bias)
        self.pooler = nn.Linear(d, d, bias=cfg.bias) if cfg.has_pair_head else None
        classes = cfg.pair_classes
        self.nsp_head = nn.Linear(d, classes, bias=cfg.bias) if cfg.has_pair_head else None
        self.sbo = SpanBoundaryHead(cfg, width=e) if cfg.sbo_max_targets > 0 else None
        # Learned maps of the hidden states to a distillation teacher's width (TinyBERT's
        # W_h and W_e), added by `add_distill_projections`; None without them.
        self.distill_proj: nn.ModuleDict | None = None
        self.tie_weights()
        self.init_weights()

    def add_distill_projections(self, width: int, *, embedding: bool) -> None:
        """Linear maps from d_model to `width` applied to the "hidden_states" output: `hidden`
        to the blocks' outputs and, with `embedding`, `embedding` to the embedding output
        (TinyBERT's W_h and W_e, trained with the student; other layers keep their width).
        Initialised like every weight of the model."""
        d = self.cfg.d_model
        maps = {"hidden": nn.Linear(d, width, bias=self.cfg.bias)}
        if embedding:
            maps["embedding"] = nn.Linear(d, width, bias=self.cfg.bias)
        self.distill_proj = nn.ModuleDict(maps)
        init_normal_(self.distill_proj, self.cfg.init_std)

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT initialisation: weights ~ N(0, init_std), biases 0, norms 1/0.

        A no-op on the meta device, so call it again after `to_empty`.
        """
        init_normal_(self, self.cfg.init_std)

    def layers(self) -> list[TransformerBlock]:
        """The blocks in the order they run (the one shared block n_layer times under ALBERT)."""
        if self.cfg.share_layers:
            return [self.blocks["0"]] * self.cfg.n_layer
        return list(self.blocks.values())

    def embed(
        self,
        input_ids_BT: torch.Tensor,
        *,
        token_type_ids_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's input (B, T, D): `embed_tokens`, projected E -> D when E != D."""
        x_BTE = self.embed_tokens(
            input_ids_BT, token_type_ids_BT=token_type_ids_BT, position_ids_BT=position_ids_BT
        )
        return self.project(x_BTE)

    def embed_tokens(
        self,
        input_ids_BT: torch.Tensor,
        *,
        token_type_ids_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Word + position + token-type embeddings, LayerNorm'ed and dropped out: (B, T, E)."""
        t = input_ids_BT.shape[-1]
        check_seq_len(t, self.max_seq_len)
        x_BTE = self.wte(input_ids_BT)
        if self.wpe is not None:
            if position_ids_BT is None:
                x_BTE = x_BTE + self.wpe(torch.arange(t, device=input_ids_BT.device))
            else:
                x_BTE = x_BTE + self.wpe(position_ids_BT)
        x_BTE = x_BTE + self._token_type_embedding(token_type_ids_BT)
        return self.drop(self.emb_ln(x_BTE))

    def project(self, x_BTE: torch.Tensor) -> torch.Tensor:
        """Embeddings of width E to the model width D (the identity when E == D)."""
        return x_BTE if self.emb_proj is None else self.emb_proj(x_BTE)

    def _token_type_embedding(self, token_type_ids_BT: torch.Tensor | None) -> torch.Tensor:
        if self.tte is None:
            # Objectives send all-zero types for single segments; anything else needs a table.
            # On a GPU, checked on the first batch only: reading the types waits for it.
            types = token_type_ids_BT
            check = types is not None and (types.device.type == "cpu" or not self._types_checked)
            self._types_checked = True
            if check and bool(types.any()):
                raise ValueError(
                    "token_type_ids has non-zero types but model.type_vocab_size=0; "
                    "set model.type_vocab_size (BERT: 2)"
                )
            return torch.zeros((), dtype=self.wte.weight.dtype, device=self.wte.weight.device)
        if token_type_ids_BT is None:
            return self.tte.weight[0]
        return self.tte(token_type_ids_BT)

    def encode(
        self,
        x_BTD: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
        states: list[torch.Tensor] | None = None,
        scores: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The encoder output (B, T, D) of the embedded tokens `x_BTD`. Given lists, appends
        each block's output to `states` (the last after ln_f when pre-LN) and each block's
        attention scores (`models.blocks.MultiHeadAttention.scores`) to `scores`."""
        rope = None
        if self.rotary is not None:
            if position_ids_BT is None:
                position_ids_BT = torch.arange(x_BTD.shape[1], device=x_BTD.device)
            rope = self.rotary(position_ids_BT)
        extra = {}
        if self.relative is not None:
            # The distances come from the length each layer attends over, which is the whole
            # sequence even where the hidden states hold a slice (sequence parallelism).
            extra["relative"] = self.relative(position_ids_BT, device=x_BTD.device)
        if scores is not None:
            if self.relative is not None:
                raise ValueError("attention scores are not computed for relative positions")
            extra["return_scores"] = True
        for block in self.layers():
            x_BTD = block(x_BTD, attn_mask=attn_mask, rope=rope, **extra)
            if scores is not None:
                x_BTD, scores_BHTT = x_BTD
                scores.append(scores_BHTT)
            if states is not None:
                states.append(x_BTD)
        x_BTD = x_BTD if self.ln_f is None else self.ln_f(x_BTD)
        if states:
            states[-1] = x_BTD
        return x_BTD

    def mlm_head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mlm_ln(self.mlm_act(self.mlm_dense(x_BTD))))

    def heads(
        self,
        x_BTD: torch.Tensor,
        labels_BT: torch.Tensor | None = None,
        *,
        sbo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        if labels_BT is None:
            out = {"logits": self.mlm_head(x_BTD)}
        else:
            row_losses_B = chunked_row_losses(
                self.mlm_head, x_BTD, labels_BT, chunk_tokens=self.loss_chunk_tokens
            )
            out = {"row_losses": row_losses_B}
        if self.nsp_head is not None:
            out["nsp_logits"] = self.nsp_head(torch.tanh(self.pooler(x_BTD[:, 0])))
        if sbo is not None:
            if self.sbo is None:
                raise ValueError("sbo_* inputs need the span boundary head: model.sbo_max_targets")
            out["sbo_logits"] = self.lm_head(self.sbo(x_BTD, *sbo))
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sbo_left: torch.Tensor | None = None,
        sbo_right: torch.Tensor | None = None,
        sbo_pos: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"logits": (B, T, V), "nsp_logits": (B, C)} for token ids (B, T) ("nsp_logits"
        only with the pair head).

        With the span boundary head, `sbo_left`, `sbo_right` (B, K) (positions of the tokens
        around each target's span) and `sbo_pos` (B, K) (its relative position in the span)
        add "sbo_logits" (B, K, V) (`SpanBoundaryHead`; objective mlm_sbo).

        `token_type_ids` (B, T): segment of each token (0 when omitted). `attention_mask`
        (B, T), True (or 1) for real tokens and False (0) for padding, which no query may
        attend to. `position_ids` (B, T) overrides 0..T-1. `attn_mask` (boolean, broadcast to
        (B, 1, T, T), True = may attend), e.g. a document mask, further restricts attention.
        With MLM `labels` (B, T) the MLM logits are not returned but scored a slice at a time:
        "row_losses" (B,) summed cross-entropy replaces "logits" (`chunked_row_losses`).

        For distillation (`distill_outputs`, set by the trainer): "hidden" adds
        "hidden_states", a list of n_layer + 1 tensors (B, T, D) (the embedding output, then
        each block's output, through the distillation projections if added), "attention"
        adds "attention_scores", n_layer tensors (B, H, T, T) of pre-softmax scores.

        A pipeline stage is this model with the modules of other stages set to None: without
        the embeddings `input_ids` is the previous stage's hidden states (B, T, D), and
        without the heads the hidden states are returned. A model built without its tables
        (`embeddings=False`) takes embedded tokens (B, T, E) the same way and projects them.
        """
        if self.wte is None:
            # Embedded tokens (B, T, E) from tables held elsewhere (ELECTRA's generator), or
            # a previous pipeline stage's hidden states (B, T, D), which hold no projection.
            x_BTD = self.project(input_ids)
        else:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must be (batch, seq_len), got {tuple(input_ids.shape)}"
                )
            x_BTD = self.embed(
                input_ids, token_type_ids_BT=token_type_ids, position_ids_BT=position_ids
            )
        # Masks cover the whole sequence, which a pipeline stage's hidden states may hold
        # only a slice of (sequence parallelism).
        t = sequence_length(input_ids, attention_mask, position_ids, attn_mask)
        mask = combine_masks(attention_mask, attn_mask, shape=(input_ids.shape[0], t))
        states = [x_BTD] if "hidden" in self.distill_outputs else None
        scores = [] if "attention" in self.distill_outputs else None
        x_BTD = self.encode(
            x_BTD, attn_mask=mask, position_ids_BT=position_ids, states=states, scores=scores
        )
        if self.lm_head is None:
            return x_BTD
        sbo = None if sbo_left is None else (sbo_left, sbo_right, sbo_pos)
        out = self.heads(x_BTD, labels, sbo=sbo)
        if states is not None:
            out["hidden_states"] = self._project_states(states)
        if scores is not None:
            out["attention_scores"] = scores
        return out

    def _project_states(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The embedding output and every block's output, through the distillation
        projections where the model has them."""
        if self.distill_proj is None:
            return states
        maps = dict(self.distill_proj.items())
        first, rest = maps.get("embedding"), maps["hidden"]
        return [first(states[0]) if first is not None else states[0]] + [
            rest(h_BTD) for h_BTD in states[1:]
        ]


def combine_masks(
    attention_mask_BT: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    *,
    shape: tuple[int, int],
) -> torch.Tensor | None:
    """One boolean mask (broadcastable to (B, 1, T, T), True = may attend) or None.

    A query whose every key is masked would get NaN from the softmax, and NaN leaks into
    every other position through the zero-weighted values of the next layer. So such a query
    attends to itself (under a document mask) or to position 0 (an all-padding row); real
    queries are unaffected.
    """
    b, t = shape
    if attention_mask_BT is None and attn_mask is None:
        return None
    key_B11T = None
    if attention_mask_BT is not None:
        if tuple(attention_mask_BT.shape) != (b, t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask_BT.shape)}, expected {(b, t)}"
            )
        key_B11T = attention_mask_BT.bool()[:, None, None, :]
    if attn_mask is None:
        # Padding alone blinds a query only in an all-padding row: let it see position 0.
        blind_B111 = ~key_B11T.any(dim=-1, keepdim=True)
        first_T = torch.arange(t, device=key_B11T.device) == 0
        return key_B11T | (blind_B111 & first_T)
    if attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be boolean (True = may attend), got {attn_mask.dtype}")
    allowed = attn_mask if key_B11T is None else key_B11T & attn_mask
    allowed_B1TT = allowed.expand(b, 1, t, t)
    blind_B1T1 = ~allowed_B1TT.any(dim=-1, keepdim=True)
    eye_TT = torch.eye(t, dtype=torch.bool, device=allowed_B1TT.device)
    return allowed_B1TT | (blind_B1T1 & eye_TT)
