"""ELECTRA (Clark et al. 2020): a small masked-LM generator and a discriminator trained
jointly by replaced token detection (RTD), as one model of its own family (`electra`).

Both networks are `models.bert.Bert` encoders, so blocks, embeddings and the MLM head are
BERT's:
    discriminator  the word, position and token-type tables and their LayerNorm (width E,
                   shared with the generator), its own E -> D projection when E != D (HF's
                   `embeddings_project`), n_layer blocks of width D; built without an MLM head
                   (`Bert(mlm_head=False)`). Its head: rtd_dense (D x D), the activation,
                   rtd_head (D -> 1), HF's `ElectraDiscriminatorPredictions`.
    generator      n_layer blocks of width G = generator_size x D (and as many times the MLP
                   width and heads: `ModelConfig.generator_config`), its own E -> G
                   projection when E != G, and BERT's MLM head (dense G -> E, activation,
                   LayerNorm(E), decoder E -> V tied to the word embeddings, with its own
                   bias), HF's `ElectraGeneratorPredictions` + `generator_lm_head`; built
                   without tables (`Bert(embeddings=False)`): it reads the discriminator's.

Why a family and not a BERT option: the forward pass runs two networks with a sampling step
between them and returns a second kind of loss, and the tensor-parallel plan, the FLOP
count, the Hugging Face twins (two models) and the objective all differ from BERT's. As a
`bert` option each of those would branch on it; as a family each names it once, and the
model itself is BERT's code put together, not a copy of it.

One training forward (objective electra, data_pipeline/objectives/electra.py, which masks
about 15% of the tokens with [MASK] and draws one uniform u per position):
  1. the generator runs on the masked input; its head runs on the masked positions only
     (gathered first into the objective's K slots a row, as ELECTRA's released code does
     with max_predictions_per_seq), scored against the original tokens;
  2. under no_grad, each masked position takes a sample from softmax(generator logits) by
     inverse CDF: the first id whose cumulative probability exceeds its u (`sample_inverse_cdf`).
     The noise comes with the batch, a pure function of (seed, sample id), so the samples
     depend neither on torch's RNG nor on the layout, and no gradient flows through them;
  3. the discriminator runs on the original tokens with the masked positions replaced by
     the samples; its target is 1 where its input differs from the original (a sample equal
     to the original counts as original).
trainer/loss.py scores the generator's summed MLM losses against the "labels" count and the
binary cross-entropy of "rtd_logits" against "rtd_targets" over the objective's scored
positions ("rtd_labels": every non-padding token), and weighs RTD by model.rtd_weight (the
paper's lambda = 50).

Pipeline parallelism is refused (`pipeline_refusal`).

Shape legend (suffixes of tensor names):
    B  batch size
    T  sequence length (tokens)
    D  discriminator width, d_model
    G  generator width, generator_size x d_model
    E  embedding width (cfg.embedding_size, or D)
    V  embedding rows (the padded vocabulary)
    N  masked positions of the batch (C: of one slice of them)
    K  slots for the masked positions of one row (`masked_positions`)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.bert import Bert, combine_masks, head_activation
from models.blocks import TiedOutputMixin, init_normal_
from models.config import ModelConfig

__all__ = ["IGNORE_INDEX", "Electra", "sample_inverse_cdf"]

# The objectives' "not scored" label (F.cross_entropy's default ignore_index): the positions
# the generator predicts are those whose label is anything else.
IGNORE_INDEX = -100


# Probabilities as integers in units of 2**-53 (float64's resolution just below 1).
_CDF_UNITS = 2.0**53


@torch.no_grad()
def sample_inverse_cdf(logits_NV: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
    """One draw from softmax(logits) per row by inverse CDF: the first id whose cumulative
    probability exceeds u in [0, 1), clamped to the last id should the rounded total stay
    below u. The probabilities are summed as integers in units of 2**-53, so the draw
    follows the distribution rather than fp32 rounding over tens of thousands of ids, and
    the sums are exact: the same on every device and in any order of addition (a floating
    cumulative sum on CUDA has no deterministic kernel). Returns int64 ids (N,)."""
    probs_NV = torch.softmax(logits_NV.float(), dim=-1)
    cdf_NV = (probs_NV.double() * _CDF_UNITS).round_().long().cumsum(dim=-1)
    threshold_N1 = (u_N.double() * _CDF_UNITS).floor_().long()[:, None]
    ids_N1 = torch.searchsorted(cdf_NV, threshold_N1, right=True)
    return ids_N1.squeeze(-1).clamp_(max=logits_NV.shape[-1] - 1)


class Electra(TiedOutputMixin, nn.Module):
    """Generator and discriminator (module docstring). `forward` takes the electra
    objective's batch with its MLM `labels` and returns {"row_losses": (B,) the generator's
    summed MLM loss per row, "rtd_logits": (B, T), "rtd_targets": (B, T) 1.0 where the
    discriminator's input token was replaced}."""

    pipeline_refusal = (
        "the discriminator's input is drawn from the generator's output, so the two networks "
        "do not split into the stages of one pipeline"
    )
    # Masked positions per slice of the generator's head and loss; 0: all of them at once.
    loss_chunk_tokens = 0

    def __init__(self, cfg: ModelConfig, *, vocab_size: int):
        super().__init__()
        cfg.validate()
        if cfg.family != "electra":
            raise ValueError(f"Electra needs model.family=electra, got {cfg.family!r}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = cfg.max_seq_len
        self.discriminator = Bert(cfg, vocab_size=vocab_size, mlm_head=False)
        self.generator = Bert(cfg.generator_config(), vocab_size=vocab_size, embeddings=False)
        d = cfg.d_model
        self.rtd_dense = nn.Linear(d, d, bias=cfg.bias)
        self.rtd_act = head_activation(cfg.activation)
        self.rtd_head = nn.Linear(d, 1, bias=cfg.bias)
        self.tie_weights()
        # The two networks initialised themselves in their constructors.
        init_normal_(self.rtd_dense, cfg.init_std)
        init_normal_(self.rtd_head, cfg.init_std)

    def tie_weights(self) -> None:
        """The generator's decoder is the shared word embedding (ELECTRA ties them)."""
        if self.cfg.tie_embeddings:
            self.generator.lm_head.weight = self.discriminator.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT's initialisation of both networks and the head: weights ~ N(0, init_std),
        biases 0, norms 1/0. A no-op on the meta device, so call it again after `to_empty`."""
        init_normal_(self, self.cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor,
        sample_uniforms: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ELECTRA step's outputs (class docstring) for the generator's input `input_ids`
        (B, T) (the masked tokens), its targets `labels` (B, T) (the original token where
        a position was masked, -100 elsewhere) and `sample_uniforms` (B, T) (one U[0, 1)
        draw per position; the masked ones choose the samples). `token_type_ids`,
        `attention_mask`, `position_ids` and `attn_mask` as for `models.bert.Bert`.

        `masked_positions` (B, K): every masked position of each row, padded with positions
        whose label is -100 (the electra objective's, padded with 0). The head then runs on
        these B x K positions, a shape known without reading the labels; without it, on the
        positions the labels select (a count the host must wait for on a GPU)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got {tuple(input_ids.shape)}")
        for name, value in (("labels", labels), ("sample_uniforms", sample_uniforms)):
            if value.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, expected {tuple(input_ids.shape)}"
                )
        b, t = input_ids.shape
        mask = combine_masks(attention_mask, attn_mask, shape=(b, t))
        extra = {"token_type_ids": token_type_ids, "position_ids": position_ids}
        chosen_BT = labels != IGNORE_INDEX
        original_BT = torch.where(chosen_BT, labels, input_ids)
        h_BTG = self._generator_states(input_ids, attn_mask=mask, **extra)
        if masked_positions is None:
            losses_N, sampled_N = self._score_and_sample(
                h_BTG[chosen_BT], labels[chosen_BT], sample_uniforms[chosen_BT]
            )
            row_losses_B = losses_N.new_zeros((b, t)).masked_scatter(chosen_BT, losses_N).sum(1)
            replaced_BT = original_BT.masked_scatter(chosen_BT, sampled_N)
        else:
            row_losses_B, replaced_BT = self._score_and_sample_slots(
                h_BTG, labels, sample_uniforms, original_BT, masked_positions
            )
        rtd_logits_BT = self._rtd_logits(replaced_BT, attn_mask=mask, **extra)
        return {
            "row_losses": row_losses_B,
            "rtd_logits": rtd_logits_BT,
            "rtd_targets": (replaced_BT != original_BT).to(rtd_logits_BT.dtype),
        }

    def generator_logits(
        self,
        input_ids: torch.Tensor,
        *,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The generator's MLM logits (B, T, V) at every position (HF's ElectraForMaskedLM)."""
        mask = combine_masks(attention_mask, None, shape=tuple(input_ids.shape))
        h_BTG = self._generator_states(
            input_ids, attn_mask=mask, token_type_ids=token_type_ids, position_ids=position_ids
        )
        return self.generator.mlm_head(h_BTG)

    def discriminator_logits(
        self,
        input_ids: torch.Tensor,
        *,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The discriminator's RTD logits (B, T), > 0 for "replaced" (HF's
        ElectraForPreTraining)."""
        mask = combine_masks(attention_mask, None, shape=tuple(input_ids.shape))
        return self._rtd_logits(
            input_ids, attn_mask=mask, token_type_ids=token_type_ids, position_ids=position_ids
        )

    def _generator_states(self, input_ids_BT, *, attn_mask, token_type_ids, position_ids):
        """The generator's encoder output (B, T, G) over the shared embeddings."""
        x_BTE = self.discriminator.embed_tokens(
            input_ids_BT, token_type_ids_BT=token_type_ids, position_ids_BT=position_ids
        )
        gen = self.generator
        return gen.encode(gen.project(x_BTE), attn_mask=attn_mask, position_ids_BT=position_ids)

    def _rtd_logits(self, input_ids_BT, *, attn_mask, token_type_ids, position_ids):
        disc = self.discriminator
        x_BTD = disc.embed(
            input_ids_BT, token_type_ids_BT=token_type_ids, position_ids_BT=position_ids
        )
        h_BTD = disc.encode(x_BTD, attn_mask=attn_mask, position_ids_BT=position_ids)
        return self.rtd_head(self.rtd_act(self.rtd_dense(h_BTD))).squeeze(-1)

    def _score_and_sample_slots(
        self,
        h_BTG: torch.Tensor,
        labels_BT: torch.Tensor,
        u_BT: torch.Tensor,
        original_BT: torch.Tensor,
        pos_BK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row losses (B,), the discriminator's input: the originals with the samples in
        place (B, T)) from the gathered positions `pos_BK`. A padding slot scores nothing
        (its label is -100) and writes its position's own token back, so a repeated padding
        position stays as is."""
        b = labels_BT.shape[0]
        if pos_BK.dim() != 2 or pos_BK.shape[0] != b:
            raise ValueError(
                f"masked_positions has shape {tuple(pos_BK.shape)}, expected ({b}, slots)"
            )
        k = pos_BK.shape[1]
        x_BKG = h_BTG.gather(1, pos_BK[..., None].expand(b, k, h_BTG.shape[-1]))
        targets_BK = labels_BT.gather(1, pos_BK)
        losses_N, sampled_N = self._score_and_sample(
            x_BKG.reshape(b * k, -1), targets_BK.reshape(-1), u_BT.gather(1, pos_BK).reshape(-1)
        )
        kept_BK = original_BT.gather(1, pos_BK)
        sampled_BK = torch.where(targets_BK != IGNORE_INDEX, sampled_N.view(b, k), kept_BK)
        return losses_N.view(b, k).sum(1), original_BT.scatter(1, pos_BK, sampled_BK)

    def _score_and_sample(
        self, x_NG: torch.Tensor, targets_N: torch.Tensor, u_N: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 cross-entropy (N,), samples (N,)) of the masked positions' states. With
        `loss_chunk_tokens` > 0 the head runs on that many positions at a time under
        activation checkpointing, so only one slice's (C, V) logits exist at once."""
        n, chunk = x_NG.shape[0], self.loss_chunk_tokens
        if chunk <= 0:
            return _head_loss_and_sample(self.generator.mlm_head, x_NG, targets_N, u_N)
        losses, samples = [], []
        for start in range(0, max(n, 1), chunk):
            piece = (x_NG[start : start + chunk], targets_N[start : start + chunk])
            loss_C, ids_C = checkpoint(
                _head_loss_and_sample,
                self.generator.mlm_head,
                *piece,
                u_N[start : start + chunk],
                use_reentrant=False,
            )
            losses.append(loss_C)
            samples.append(ids_C)
        return torch.cat(losses), torch.cat(samples)


def _head_loss_and_sample(
    head, x_CG: torch.Tensor, targets_C: torch.Tensor, u_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits_CV = head(x_CG)
    loss_C = F.cross_entropy(logits_CV.float(), targets_C, reduction="none")
    return loss_C, sample_inverse_cdf(logits_CV.detach(), u_C)
