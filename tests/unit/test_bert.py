"""The Bert family: configs, parameter counts against Hugging Face, masks, ALBERT options,
FLOPs, and a tiny overfit on a fixed MLM + NSP batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models import ModelConfig, build_model, param_counts
from models.bert import Bert, combine_masks
from models.blocks import TransformerBlock
from models.flops import flops_per_token

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
NAMES = (
    "bert_debug",
    "bert_base",
    "bert_large",
    "albert_debug",
    "roberta_debug",
    "roberta_base",
    "roberta_large",
)
VOCAB = 366  # the byte tokenizer's


def load(name: str, **overrides) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    return dataclasses.replace(cfg, **overrides)


def debug_bert(name: str = "bert_debug", seed: int = 0, **overrides) -> Bert:
    torch.manual_seed(seed)
    cfg = load(name, **overrides)
    return build_model(cfg, vocab_size=cfg.padded_vocab_size(VOCAB)).eval()


def ids(b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- configs and sizes -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_yaml_sets_model_fields_and_validates(name):
    path = CONF_DIR / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert set(raw) <= {f.name for f in dataclasses.fields(ModelConfig)}
    assert path.read_text().splitlines()[0] == "# @package model"
    cfg = load(name)
    assert cfg.name == name and cfg.family == "bert"
    cfg.validate()


def test_parameter_count_by_hand():
    cfg = load("bert_debug")
    v, d, f, t, layers = VOCAB, 128, 512, 128, 2
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attn, mlp, two LayerNorms
    embeddings = v * d + t * d + 2 * d + 2 * d
    heads = (d * d + d + 2 * d + v) + (d * d + d) + (2 * d + 2)  # MLM transform, pooler, NSP
    model = build_model(cfg, vocab_size=v)
    assert param_counts(model)["total"] == embeddings + layers * block + heads


def test_without_the_pair_head_there_is_no_pooler_classifier_or_nsp_output():
    """RoBERTa (pair_head=false): bert_debug's count less the pooler and the NSP classifier,
    and the outputs and FLOPs of the MLM head alone."""
    d, t = 128, 128
    ours = debug_bert("roberta_debug")
    bert = debug_bert("bert_debug", type_vocab_size=1, layer_norm_eps=1e-5)
    assert ours.pooler is None and ours.nsp_head is None
    assert not any(name.startswith(("pooler", "nsp_head")) for name, _ in ours.named_parameters())
    removed = (d * d + d) + (2 * d + 2)
    assert param_counts(bert)["total"] - param_counts(ours)["total"] == removed
    out = ours(ids(3, 20))
    assert set(out) == {"logits"} and out["logits"].shape == (3, 20, VOCAB)
    labels = torch.full((3, 20), -100)
    labels[:, 3] = 7
    assert set(ours(ids(3, 20), labels=labels)) == {"row_losses"}
    gap = flops_per_token(bert.cfg, vocab_size=VOCAB, seq_len=t)
    gap -= flops_per_token(ours.cfg, vocab_size=VOCAB, seq_len=t)
    assert gap == pytest.approx(6 * (d * d + 2 * d) / t, rel=1e-9)


# ---- forward ------------------------------------------------------------------------------


def test_forward_shapes_and_tied_decoder():
    model = debug_bert()
    out = model(ids(3, 20), token_type_ids=torch.ones(3, 20, dtype=torch.long))
    assert out["logits"].shape == (3, 20, VOCAB) and out["nsp_logits"].shape == (3, 2)
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.bias is not None
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.wte.weight
    untied = debug_bert(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    delta = param_counts(untied)["total"] - param_counts(debug_bert())["total"]
    assert delta == VOCAB * 128


def test_blocks_are_post_ln_with_exact_gelu():
    model = debug_bert()
    block = model.blocks["0"]
    assert isinstance(block, TransformerBlock) and not block.pre_ln
    assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
    assert model.ln_f is None
    assert debug_bert(pre_ln=True).ln_f is not None


def test_token_types_change_the_output():
    model = debug_bert()
    x = ids()
    a = model(x)["logits"]
    b = model(x, token_type_ids=torch.ones_like(x))["logits"]
    torch.testing.assert_close(a, model(x, token_type_ids=torch.zeros_like(x))["logits"])
    assert not torch.allclose(a, b)


def test_padding_is_invisible_to_real_tokens():
    model = debug_bert()
    x = ids(2, 12)
    short = model(x)
    padded_ids = torch.cat([x, ids(2, 5, seed=9)], dim=1)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[:, :12] = True
    padded = model(padded_ids, attention_mask=mask)
    torch.testing.assert_close(padded["logits"][:, :12], short["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded["nsp_logits"], short["nsp_logits"], rtol=1e-5, atol=1e-5)
    unmasked = model(padded_ids)
    assert not torch.allclose(unmasked["logits"][:, :12], short["logits"], atol=1e-3)
    # 0/1 integer masks (the Hugging Face convention) mean the same.
    as_int = model(padded_ids, attention_mask=mask.long())
    torch.testing.assert_close(as_int["logits"], padded["logits"])


def test_document_mask_separates_documents_without_nans():
    model = debug_bert()
    x = ids(2, 16)
    doc = torch.zeros(16, dtype=torch.long)
    doc[8:] = 1
    attn_mask = (doc[:, None] == doc[None, :])[None, None].expand(2, 1, 16, 16)
    y = model(x, attn_mask=attn_mask)["logits"]
    x2 = x.clone()
    x2[:, 10:] = ids(2, 6, seed=5)
    y2 = model(x2, attn_mask=attn_mask)["logits"]
    torch.testing.assert_close(y[:, :8], y2[:, :8])
    assert not torch.allclose(y[:, 8:], y2[:, 8:], atol=1e-4)
    # Padding at the end of the second document, and an all-padding row: no NaN anywhere.
    pad = torch.ones(2, 16, dtype=torch.bool)
    pad[0, 8:] = False
    pad[1] = False
    assert torch.isfinite(model(x, attention_mask=pad, attn_mask=attn_mask)["logits"]).all()
    assert torch.isfinite(model(x, attention_mask=pad)["logits"]).all()


def test_combine_masks():
    assert combine_masks(None, None, shape=(2, 4)) is None
    key = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    m = combine_masks(key, None, shape=(2, 4))
    assert m.shape == (2, 1, 1, 4)
    assert m[0, 0, 0].tolist() == [True, True, False, False]
    assert m[1, 0, 0].tolist() == [True, False, False, False]  # all padding: sees position 0
    doc = torch.tensor([0, 0, 1, 1])
    attn = (doc[:, None] == doc[None, :])[None, None]
    m = combine_masks(key, attn, shape=(2, 4))
    assert m[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="attention_mask"):
        combine_masks(key[:, :3], None, shape=(2, 4))
    with pytest.raises(ValueError, match="attn_mask must be boolean"):
        combine_masks(None, attn.float(), shape=(2, 4))


def test_bad_inputs_and_configs_are_named():
    with pytest.raises(ValueError, match="max_seq_len"):
        debug_bert()(ids(1, 129))
    with pytest.raises(ValueError, match="model.position"):
        debug_bert(position="relative")
    with pytest.raises(ValueError, match="model.n_decoder_layer"):
        debug_bert(n_decoder_layer=2)
    no_types = debug_bert(type_vocab_size=0)
    no_types(ids(), token_type_ids=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="type_vocab_size"):
        no_types(ids(), token_type_ids=torch.ones(2, 16, dtype=torch.long))


def test_rotary_variant_runs_without_a_position_table():
    model = debug_bert(position="rotary")
    assert model.wpe is None
    assert model(ids())["logits"].shape == (2, 16, VOCAB)


# ---- ALBERT -------------------------------------------------------------------------------


def test_albert_sharing_and_factorisation_save_the_expected_parameters():
    albert = debug_bert("albert_debug")
    unshared = debug_bert("albert_debug", share_layers=False)
    block = sum(p.numel() for p in albert.blocks["0"].parameters())
    assert len(albert.blocks) == 1 and len(albert.layers()) == 4
    assert param_counts(unshared)["total"] - param_counts(albert)["total"] == 3 * block
    # Factorised embeddings: tables of width E=32 plus a 32 -> 128 projection, and an MLM
    # head mapping 128 -> 32 before the tied decoder.
    full = debug_bert("albert_debug", embedding_size=None)
    e, d, t = 32, 128, 128
    saved = (VOCAB + t + 2) * (d - e) + 2 * (d - e)  # tables, embedding LayerNorm
    saved -= e * d + d  # the projection
    saved += (d * d + d + 2 * d) - (d * e + e + 2 * e)  # the MLM transform and its LayerNorm
    assert param_counts(full)["total"] - param_counts(albert)["total"] == saved
    assert albert.lm_head.weight is albert.wte.weight and albert.wte.weight.shape == (VOCAB, e)


def test_shared_block_runs_n_layer_times():
    albert = debug_bert("albert_debug")
    x = ids()
    h = albert.embed(x)
    for _ in range(4):
        h = albert.blocks["0"](h)
    expected = albert.heads(h)
    torch.testing.assert_close(albert(x)["logits"], expected["logits"])
    two_layers = debug_bert("albert_debug", n_layer=2)
    two_layers.load_state_dict(albert.state_dict())
    assert not torch.allclose(two_layers(x)["logits"], expected["logits"], atol=1e-4)


# ---- FLOPs --------------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    cfg = load("bert_base")
    v, d, f, layers, t = 30522, 768, 3072, 12, 512
    n_matmul = layers * (4 * d * d + 2 * d * f) + d * d + v * d + (d * d + 2 * d) / t
    expected = 6 * n_matmul + 12 * layers * d * t
    assert flops_per_token(cfg, vocab_size=v, seq_len=t) == pytest.approx(expected, rel=1e-12)
    # ALBERT: the shared block runs n_layer times; the projection E -> D adds E * D.
    albert = load("albert_debug")
    e, d, f, layers = 32, 128, 512, 4
    n_matmul = layers * (4 * d * d + 2 * d * f) + e * d + d * e + VOCAB * e + (d * d + 2 * d) / t
    got = flops_per_token(albert, vocab_size=VOCAB, seq_len=t)
    assert got == pytest.approx(6 * n_matmul + 12 * layers * d * t, rel=1e-12)


# ---- training ---------------------------------------------------------------------------


def test_debug_bert_overfits_one_mlm_nsp_batch():
    from data_pipeline.config import DataConfig
    from data_pipeline.objectives import split_batch
    from data_pipeline.objectives.mlm import MaskedLM
    from data_pipeline.tokenizers import ByteTokenizer

    text = b"Loom trains BERT on bytes. Masks are drawn per sample. The loss must fall fast. "
    data = np.frombuffer(text * 20, dtype=np.uint8).astype(np.int64)
    rows = np.stack([data[11 * i : 11 * i + 33] for i in range(8)])
    sent = np.zeros(rows.shape, dtype=bool)
    sent[:, 1:] = rows[:, :-1] == ord(" ")
    sent &= np.roll(rows == ord("."), 2, axis=1)
    batch = {"tokens": torch.from_numpy(rows), "sample_ids": torch.arange(8)}
    batch["sent_start"] = torch.from_numpy(sent)
    objective = MaskedLM("mlm_nsp", cfg=DataConfig(), tokenizer=ByteTokenizer(), seq_len=32, seed=0)
    inputs, labels = split_batch(objective(batch))
    assert labels["nsp_labels"].float().mean().item() not in (0.0, 1.0)

    model = debug_bert().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    threads = torch.get_num_threads()
    # Ops this small are all overhead: one thread avoids OpenMP synchronisation, which costs
    # 5x on a loaded machine.
    torch.set_num_threads(1)
    try:
        for step in range(50):
            out = model(**inputs)
            mlm = F.cross_entropy(out["logits"].flatten(0, 1), labels["labels"].flatten())
            nsp = F.cross_entropy(out["nsp_logits"], labels["nsp_labels"])
            if step == 0:
                first = (mlm.item(), nsp.item())
            opt.zero_grad()
            (mlm + nsp).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert first[0] > 5.0  # about ln(366) at initialisation
    assert mlm.item() < 0.3 and nsp.item() < 0.1, (first, mlm.item(), nsp.item())
