from __future__ import annotations

import pytest
import torch

from models import build_model
from models.config import ModelConfig
from parallel.activation import apply_activation_checkpointing
from parallel.parallelize import repeated_blocks


def grads_after_step(mode: str, family_cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(family_cfg, vocab_size=300)
    names_before = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(repeated_blocks(model), mode)
    assert [n for n, _ in model.named_parameters()] == names_before  # checkpoints unchanged
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # same dropout stream in every mode
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_leaves_loss_and_grads_unchanged(mode, dropout):
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=2, max_seq_len=32, dropout=dropout)
    ref_loss, ref = grads_after_step("none", cfg)
    loss, grads = grads_after_step(mode, cfg)
    assert torch.equal(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="parallel.activation_checkpointing"):
        apply_activation_checkpointing([], "sometimes")
