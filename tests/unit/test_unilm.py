"""UniLM (data.objective=unilm): the four tasks' attention masks against hand-written ones,
the task shares within binomial bounds, the bidirectional rows equal to mlm_nsp's, the
masks reaching the model (no position sees what its task hides), and trainer.init_from
extending BERT's two segment embeddings to UniLM's six."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import CheckpointError
from data_pipeline.config import UNILM_TASKS, DataConfig, UnilmConfig
from data_pipeline.objectives import IGNORE_INDEX
from data_pipeline.objectives.unilm import TASK_TYPES, UnifiedLM, task_mask
from models import build_model
from tests.unit.test_mlm import PAD, TOK, objective, text_rows
from tests.unit.test_models import load_model_config
from trainer.init_from import init_weights

T = 64


def unilm(seed: int = 0, **shares) -> UnifiedLM:
    cfg = DataConfig(unilm=UnilmConfig(**shares))
    return UnifiedLM("unilm", cfg=cfg, tokenizer=TOK, seq_len=T, seed=seed)


def test_task_masks_by_hand():
    x, o = True, False
    assert task_mask("left_to_right", 3, 0).tolist() == [[x, o, o], [x, x, o], [x, x, x]]
    assert task_mask("right_to_left", 3, 0).tolist() == [[x, x, x], [o, x, x], [o, o, x]]
    assert task_mask("bidirectional", 2, 0).all()
    # Source [CLS] a [SEP] (3 tokens), target b c: the source never sees the target.
    assert task_mask("seq2seq", 5, 3).tolist() == [
        [x, x, x, o, o],
        [x, x, x, o, o],
        [x, x, x, o, o],
        [x, x, x, x, o],
        [x, x, x, x, x],
    ]


def test_task_shares_within_binomial_bounds():
    obj, n = unilm(), 6000
    tasks = [obj.task(i) for i in range(n)]
    expected = {"bidirectional": 1 / 3, "seq2seq": 1 / 3, "left_to_right": 1 / 6}
    expected["right_to_left"] = 1 / 6
    for task, p in expected.items():
        share = tasks.count(task) / n
        assert abs(share - p) < 4.5 * math.sqrt(p * (1 - p) / n), (task, share)
    only = unilm(bidirectional=0.0, seq2seq=0.0, left_to_right=1.0, right_to_left=0.0)
    assert {only.task(i) for i in range(50)} == {"left_to_right"}


def test_rows_follow_their_task():
    obj, batch = unilm(), text_rows(48, T, eos_every=40)
    out = obj(batch)
    pairs = objective("mlm_nsp", seq_len=T)(batch)  # same seed: same pair and mask streams
    seen = set()
    for r in range(48):
        task = obj.task(r)
        seen.add(task)
        ids, types = out["input_ids"][r], out["token_type_ids"][r]
        real = ids != PAD
        assert torch.equal(out["attention_mask"][r], real)
        first, second = TASK_TYPES[task]
        assert set(types[real].tolist()) <= {first, second}
        if task == "bidirectional":
            for key in ("input_ids", "labels", "token_type_ids", "nsp_labels"):
                assert torch.equal(out[key][r], pairs[key][r]), key
        else:
            assert out["nsp_labels"][r] == IGNORE_INDEX
        source = int((types == first).sum()) if task == "seq2seq" else T  # padding is type 0
        expected = torch.from_numpy(task_mask(task, T, source))
        assert torch.equal(out["attn_mask"][r, 0], expected), task
        assert (out["labels"][r] != IGNORE_INDEX).any()
    assert seen == set(UNILM_TASKS)
    assert out["attn_mask"].shape == (48, 1, T, T)


@pytest.mark.parametrize("task", ["left_to_right", "right_to_left", "seq2seq"])
def test_model_sees_only_what_the_task_allows(task):
    """Changing a token that a position may not attend to leaves that position's output
    unchanged (within float noise); changing one it may attend to changes it."""
    torch.manual_seed(0)
    cfg = load_model_config("unilm_debug")
    model = build_model(cfg, vocab_size=TOK.vocab_size).eval()
    obj = unilm(**{k: float(k == task) for k in UNILM_TASKS})
    out = obj(text_rows(1, T))
    inputs = {k: v for k, v in out.items() if not k.endswith("labels")}
    hidden = []
    for change in (None, 40):
        ids = inputs["input_ids"].clone()
        if change is not None:
            ids[0, change] = (ids[0, change] + 1) % 200 + 10
        with torch.no_grad():
            x = model.embed(ids, token_type_ids_BT=inputs["token_type_ids"])
            mask = inputs["attn_mask"] & inputs["attention_mask"][:, None, None, :]
            hidden.append(model.encode(x, attn_mask=mask))
    moved = (hidden[0] - hidden[1]).abs().amax(-1)[0]
    allowed = inputs["attn_mask"][0, 0, :, 40]
    # Through two layers a position is reached via any chain of allowed positions; under
    # these masks that is the same set as one step (they are transitive).
    assert (moved[~allowed] < 1e-6).all()
    assert (moved[allowed] > 1e-4).all()


def test_init_from_extends_token_types_and_keeps_missing_tensors():
    torch.manual_seed(0)
    bert = build_model(load_model_config("bert_debug"), vocab_size=300)
    torch.manual_seed(1)
    uni = build_model(load_model_config("unilm_debug"), vocab_size=300)
    state = {k: v for k, v in bert.state_dict().items() if not k.startswith("nsp_head")}
    before = uni.state_dict()["nsp_head.weight"].clone()
    init_weights(uni, state, source="bert")
    torch.testing.assert_close(uni.wte.weight, bert.wte.weight)
    torch.testing.assert_close(uni.blocks["1"].mlp.fc_in.weight, bert.blocks["1"].mlp.fc_in.weight)
    assert uni.tte.weight.shape[0] == 6
    for row in range(6):
        torch.testing.assert_close(uni.tte.weight[row], bert.tte.weight[row % 2])
    torch.testing.assert_close(uni.state_dict()["nsp_head.weight"], before)  # source lacks it
    wide = build_model(load_model_config("unilm_debug", d_model=64, n_head=2), vocab_size=300)
    with pytest.raises(CheckpointError, match="wte.weight has shape"):
        init_weights(wide, bert.state_dict(), source="bert")


def test_shares_must_add_up():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="add up"):
        UnilmConfig(bidirectional=0.5).validate()
    np.testing.assert_allclose(unilm().shares.sum(), 1.0)


def test_ngram_masking_draws_unilm_lengths():
    """data.mlm.unit=ngram: span lengths 1/2/3 at 0.8/0.1/0.1 within binomial bounds, and
    still 15% of the tokens masked."""
    from data_pipeline.objectives.mlm import NGRAM_PROBS, sample_spans

    rng = np.random.default_rng(0)
    _, drawn = sample_spans(np.ones(200_000, dtype=np.int64), 30_000, rng, probs=NGRAM_PROBS)
    n = len(drawn)
    for length, p in zip((1, 2, 3), NGRAM_PROBS, strict=True):
        share = float((drawn == length).mean())
        assert abs(share - p) < 4.5 * math.sqrt(p * (1 - p) / n), (length, share)
    out = objective("mlm", seq_len=T, unit="ngram")(text_rows(64, T))
    chosen = (out["labels"] != IGNORE_INDEX).sum(1).float()
    assert abs(chosen.mean().item() / (T - 2) - 0.15) < 0.02
