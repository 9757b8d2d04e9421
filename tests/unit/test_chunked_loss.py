"""The chunked loss (`trainer.loss_chunk_tokens`): each family's model scores its logits a
slice at a time, with the loss and every gradient of the whole-logits cross-entropy
(`F.cross_entropy` over the full (B, T, V) logits), and no op of forward or backward makes
a tensor as large as the whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from models.blocks import chunked_row_losses
from tests.unit.test_models import load_model_config
from trainer.loss import summed_losses, with_chunked_labels

VOCAB, B, T = 384, 3, 32


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def batch(family: str, t: int = T) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, VOCAB, (B, t), generator=g)}
    labels = {"labels": torch.randint(0, VOCAB, (B, t), generator=g)}  # ids of any vocab
    labels["labels"][0, :7] = -100  # unscored positions
    labels["labels"][1, 20:] = -100
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, VOCAB, (B, T), generator=g)
    if family == "bert":
        labels["nsp_labels"] = torch.tensor([0, 1, 1])
    return inputs, labels


def loss_and_grads(model, inputs, labels, *, chunk: int | None):
    model.zero_grad()
    if chunk is not None:
        model.loss_chunk_tokens = chunk
        inputs = with_chunked_labels(inputs, labels, chunk)
    sums = summed_losses(model(**inputs), labels)
    sum(sums.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in sums.items()}, grads


@pytest.mark.parametrize("name", ["gpt_debug", "bert_debug", "glm_debug", "t5_debug"])
@pytest.mark.parametrize("chunk", [10, 1000])
def test_chunked_loss_and_gradients_equal_whole_logits(name, chunk):
    torch.manual_seed(0)
    model = build_model(load_model_config(name), vocab_size=VOCAB)
    inputs, labels = batch(name.split("_")[0])
    whole, whole_grads = loss_and_grads(model, inputs, labels, chunk=None)
    chunked, chunked_grads = loss_and_grads(model, inputs, labels, chunk=chunk)
    assert set(chunked) == set(whole) and set(chunked_grads) == set(whole_grads)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-6, atol=1e-5)
    for key in whole_grads:
        # Summed in another order: float32 rounding of gradients of order 1.
        torch.testing.assert_close(chunked_grads[key], whole_grads[key], rtol=1e-4, atol=1e-5)


def test_no_tensor_as_large_as_the_logits():
    """Whole logits make (B*T, V) tensors; slices of 12 tokens (4 positions x 3 rows) never
    make anything larger than a slice's logits or the largest parameter, in forward or
    backward."""
    torch.manual_seed(0)
    vocab = 4 * VOCAB  # the logits outgrow every parameter (embedding V x 128 included)
    model = build_model(load_model_config("gpt_debug"), vocab_size=vocab)
    largest_param = max(p.numel() for p in model.parameters())
    t = 96
    assert B * t * vocab > largest_param
    inputs, labels = batch("gpt", t)
    for chunk, bound in ((None, B * t * vocab), (12, max(12 * vocab, largest_param))):
        with LargestTensor() as mode:
            loss_and_grads(model, inputs, labels, chunk=chunk)
        if chunk is None:
            assert mode.largest >= bound  # the control: the whole logits exist
        else:
            assert mode.largest <= bound, (mode.largest, bound)


def test_hand_computed_row_losses_and_sequence_shards():
    """Row sums against F.cross_entropy directly; hidden states holding half the sequence
    (sequence parallelism) are scored against the labels of the positions a gather of the
    same slices from both halves brings together."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    x_BTD, labels_BT = torch.randn(2, 6, 8), torch.randint(0, 11, (2, 6))
    labels_BT[1, 2] = -100
    expected_B = F.cross_entropy(head(x_BTD).transpose(1, 2), labels_BT, reduction="none").sum(1)
    got_B = chunked_row_losses(head, x_BTD, labels_BT, chunk_tokens=4)
    torch.testing.assert_close(got_B, expected_B)

    halves = x_BTD.chunk(2, dim=1)  # rank 0 holds positions 0-2, rank 1 positions 3-5

    def gathering_head(local_BCD):  # stands in for a head whose input hook all-gathers
        c = local_BCD.shape[1]
        start = next(s for s in range(3) if torch.equal(halves[0][:, s : s + c], local_BCD))
        return head(torch.cat([h[:, start : start + c] for h in halves], dim=1))

    got_B = chunked_row_losses(gathering_head, halves[0], labels_BT, chunk_tokens=4)
    torch.testing.assert_close(got_B, expected_B)
