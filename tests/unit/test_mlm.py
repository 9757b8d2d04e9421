"""Masked-LM objectives: mask statistics, whole words, spans, pair layouts, determinism."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, MlmConfig
from data_pipeline.objectives import IGNORE_INDEX, build_objective, sample_rng
from data_pipeline.objectives.mlm import (
    MaskedLM,
    nsp_layout,
    sample_spans,
    span_length_probs,
    word_start_table,
)
from data_pipeline.tokenizers import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer

TOK = ByteTokenizer()
SP = TOK.special_tokens
CLS, SEP, MASK, PAD, EOS = SP["[CLS]"], SP["[SEP]"], SP["[MASK]"], SP["<pad>"], SP["<eos>"]
TEXT = (
    "The quick brown fox jumps over the lazy dog. It barked twice at the moon! "
    "Nobody in the village heard a thing, and the night went on as before. "
) * 8


def objective(name: str = "mlm", *, seq_len: int = 64, seed: int = 0, tok=TOK, **mlm):
    cfg = DataConfig(mlm=dataclasses.replace(MlmConfig(), **mlm))
    return MaskedLM(name, cfg=cfg, tokenizer=tok, seq_len=seq_len, seed=seed)


def text_rows(n: int, seq_len: int, *, eos_every: int | None = None) -> dict[str, torch.Tensor]:
    """n packed rows of TEXT bytes (each starting at a different offset), sentence starts set."""
    data = np.frombuffer(TEXT.encode() * 4, dtype=np.uint8).astype(np.int64)
    rows = np.stack([data[(7 * i) % 300 : (7 * i) % 300 + seq_len + 1] for i in range(n)])
    if eos_every:
        rows[:, eos_every::eos_every] = EOS
    prev = np.zeros_like(rows)
    prev[:, 1:] = rows[:, :-1]
    doc = np.zeros(rows.shape, dtype=bool)
    doc[:, 1:] = rows[:, :-1] == EOS
    sent = doc | np.isin(prev, [ord("."), ord("!")])
    return {
        "tokens": torch.from_numpy(rows),
        "sample_ids": torch.arange(n, dtype=torch.int64),
        "doc_start": torch.from_numpy(doc),
        "sent_start": torch.from_numpy(sent),
    }


def unmasked(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sequence before masking: labels where a token was chosen, the input elsewhere."""
    return torch.where(out["labels"] != IGNORE_INDEX, out["labels"], out["input_ids"])


# ---- token masking statistics -----------------------------------------------------------


def test_selection_rate_and_80_10_10_split():
    batch = text_rows(400, 128)
    out = objective(seq_len=128)(batch)
    original = unmasked(out)
    chosen = out["labels"] != IGNORE_INDEX
    content = ~torch.isin(original, torch.tensor(list(SP.values())))
    rate = chosen.sum().item() / content.sum().item()
    assert abs(rate - 0.15) < 0.003  # a rounded 15% of each row's 126 content tokens
    inputs = out["input_ids"][chosen]
    labels = out["labels"][chosen]
    n = len(labels)
    masked = (inputs == MASK).sum().item() / n
    kept = (inputs == labels).sum().item() / n
    replaced = ((inputs != MASK) & (inputs != labels)).sum().item() / n
    assert abs(masked - 0.8) < 0.015
    assert abs(kept - 0.1) < 0.015  # 10% kept + 10% * 1/256 random picks of the same byte
    assert abs(replaced - 0.1) < 0.015
    # Random replacements are never special tokens; unchosen tokens never change.
    assert not torch.isin(inputs[(inputs != MASK)], torch.tensor(list(SP.values()))).any()
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])


@pytest.mark.parametrize("name", ["mlm", "mlm_nsp", "mlm_sop"])
@pytest.mark.parametrize("unit", ["token", "word", "span"])
def test_special_tokens_are_never_chosen(name, unit):
    batch = text_rows(64, 64, eos_every=21)
    out = objective(name, seq_len=64, unit=unit)(batch)
    original = unmasked(out)
    special = torch.isin(original, torch.tensor(list(SP.values())))
    assert (out["labels"][special] == IGNORE_INDEX).all()
    assert torch.equal(out["input_ids"][special], original[special])
    assert (out["labels"] != IGNORE_INDEX).any()


def test_changed_config_changes_the_statistics():
    batch = text_rows(200, 128)
    out = objective(seq_len=128, mask_prob=0.3, replace_with_mask=1.0, replace_with_random=0.0)(
        batch
    )
    chosen = out["labels"] != IGNORE_INDEX
    assert abs(chosen.sum().item() / (200 * 126) - 0.3) < 0.003
    assert (out["input_ids"][chosen] == MASK).all()


# ---- whole words ------------------------------------------------------------------------


def tiny_wordpiece() -> HFTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = ["un", "##believ", "##able", "results", "show", "remark", "improve", "##ments", "."]
    vocab = {tok: i for i, tok in enumerate(["[UNK]", *pieces])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return HFTokenizer("wordpiece", tok)


def test_wordpiece_word_starts_by_hand():
    tok = tiny_wordpiece()
    ids = tok.encode("unbelievable results show remarkable improvements.")
    pieces = [tok.hf_tokenizer.id_to_token(i) for i in ids]
    assert pieces == [
        "un", "##believ", "##able", "results", "show",
        "remark", "##able", "improve", "##ments", ".",
    ]  # fmt: skip
    obj = objective(tok=tok, unit="word", seq_len=len(ids) + 2)
    seq = np.array([[tok.special_tokens["[CLS]"], *ids, tok.special_tokens["[SEP]"]]])
    starts = obj._word_starts(seq)[0].astype(int).tolist()
    assert starts == [0, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0]


def test_whole_word_masking_masks_whole_words_only():
    tok = tiny_wordpiece()
    ids = tok.encode("unbelievable results show remarkable improvements. " * 4)
    words = [[0, 1, 2], [3], [4], [5, 6], [7, 8], [9]]  # token indices of each word
    n = 300
    batch = {
        "tokens": torch.tensor([ids[:21]] * n),
        "sample_ids": torch.arange(n),
    }
    out = objective(tok=tok, unit="word", seq_len=20, mask_prob=0.3)(batch)
    chosen = (out["labels"][:, 1:-1] != IGNORE_INDEX).numpy()  # content tokens 0..17
    partial = 0
    for row in chosen:
        for w in words + [[i + 10 for i in w] for w in words[:3]]:
            partial += 0 < row[w].sum() < len(w)
    assert partial == 0
    # Multi-token words are chosen too, not only the single-token ones.
    assert chosen[:, 0].any() and chosen[:, 5].any()
    assert abs(chosen.sum() / chosen.size - 0.3) < 0.05


def test_byte_words_start_after_whitespace_or_special():
    obj = objective(unit="word", seq_len=11)
    seq = np.array([[CLS, *b"ab cd\n\xc3\xa9f", SEP]])
    starts = obj._word_starts(seq)[0].astype(int).tolist()
    #            CLS a  b  ' ' c  d  \n  é(2 bytes) f  SEP
    assert starts == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0]


def test_byte_level_bpe_words_start_at_space_markers():
    from data_pipeline.tokenizers import build_tokenizer

    tok = build_tokenizer("bpe:400", train_texts=[TEXT])
    marker, ends_space, _ = word_start_table(tok)
    for i in range(tok.vocab_size):
        piece = tok.hf_tokenizer.id_to_token(i)
        if piece and i not in tok.special_tokens.values():
            spaces = set(piece) <= set("ĠĊĉčċČ")  # space, \n, \t, \r, \v, \f
            assert marker[i] == (piece.startswith("Ġ") and not spaces)
            assert ends_space[i] == (piece[-1] in "ĠĊĉčċČ")
    ids = tok.encode("fox jumps\nover")
    obj = objective(tok=tok, unit="word", seq_len=len(ids) + 2)
    seq = np.array([[tok.special_tokens["[CLS]"], *ids, tok.special_tokens["[SEP]"]]])
    starts = obj._word_starts(seq)[0]
    words = []
    for i, tid in enumerate(seq[0, 1:-1], start=1):
        piece = tok.hf_tokenizer.id_to_token(int(tid))
        words.append(piece) if starts[i] else words.__setitem__(-1, words[-1] + piece)
    # The tiny vocabulary splits as fo x Ġ ju mp s Ċ ov er: a lone 'Ġ' or 'Ċ' is trailing
    # space of the word before it.
    assert words == ["foxĠ", "jumpsĊ", "over"]


# ---- spans ------------------------------------------------------------------------------


def test_span_length_distribution_is_the_truncated_geometric():
    probs = span_length_probs(0.2, 10)
    mean = float((np.arange(1, 11) * probs).sum())
    assert abs(mean - 3.797) < 0.001  # SpanBERT (Joshi et al. 2020) reports 3.8
    drawn = np.concatenate(
        [
            sample_spans(np.ones(2000, dtype=int), 300, sample_rng(0, i), p=0.2, max_len=10)[1]
            for i in range(40)
        ]
    )
    assert drawn.max() <= 10 and drawn.min() >= 1
    assert abs(drawn.mean() - mean) < 0.12
    assert abs((drawn == 1).mean() - probs[0]) < 0.03


def test_spans_cover_consecutive_whole_words_within_budget():
    rng = sample_rng(3, 3)
    unit_len = rng.integers(1, 4, size=500)
    chosen, drawn = sample_spans(unit_len, 150, rng, p=0.2, max_len=10)
    covered = int(unit_len[chosen].sum())
    assert 140 <= covered <= 150
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, chosen.astype(int), 0])))[::2]
    assert len(runs) <= len(drawn)  # spans may touch, never split
    assert runs.mean() > 2.5


def test_span_objective_masks_whole_words():
    out = objective(unit="span", seq_len=128, mask_prob=0.2)(text_rows(50, 128))
    original = unmasked(out).numpy()
    chosen = (out["labels"] != IGNORE_INDEX).numpy()
    obj = objective(unit="word", seq_len=128)
    starts = obj._word_starts(original)
    word_id = np.cumsum(starts, axis=1)
    for row in range(50):
        content = ~obj.is_special[original[row]]
        for w in np.unique(word_id[row][content]):
            in_word = (word_id[row] == w) & content
            assert chosen[row][in_word].all() or not chosen[row][in_word].any()


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlm", "mlm_nsp", "mlm_sop"])
def test_rows_depend_only_on_seed_and_sample_id(name):
    batch = text_rows(6, 64, eos_every=40)
    obj = objective(name, seq_len=64, unit="span")
    full = obj(batch)
    # The same samples in another order and split into other batches give the same rows.
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    parts = [{k: v[perm[i : i + 3]] for k, v in batch.items()} for i in (0, 3)]
    outs = [obj(p) for p in parts]
    for key, value in full.items():
        torch.testing.assert_close(torch.cat([o[key] for o in outs]), value[perm], rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(obj))(batch)
    for key, value in full.items():
        assert torch.equal(again[key], value)
    other_seed = objective(name, seq_len=64, unit="span", seed=1)(batch)
    assert not torch.equal(other_seed["labels"], full["labels"])


def test_masks_change_with_the_sample_id():
    batch = text_rows(2, 64)
    batch["tokens"][1] = batch["tokens"][0]
    out = objective(seq_len=64)(batch)
    assert torch.equal(unmasked(out)[0], unmasked(out)[1])
    assert not torch.equal(out["labels"][0], out["labels"][1])


# ---- sequence structure ---------------------------------------------------------------------


def test_mlm_structure():
    batch = text_rows(3, 16)
    out = objective(seq_len=16)(batch)
    rows = batch["tokens"]
    expected = torch.cat([torch.full((3, 1), CLS), rows[:, :14], torch.full((3, 1), SEP)], 1)
    assert torch.equal(unmasked(out), expected)
    assert (out["token_type_ids"] == 0).all() and out["attention_mask"].all()
    assert "nsp_labels" not in out


def pair_batch(row: list[int], sent: list[int], n: int) -> dict[str, torch.Tensor]:
    tokens = torch.tensor([row] * n)
    sent_start = torch.zeros_like(tokens, dtype=torch.bool)
    sent_start[:, sent] = True
    return {"tokens": tokens, "sample_ids": torch.arange(n), "sent_start": sent_start}


def test_nsp_structure_with_a_jump_by_hand():
    # One document of 17 tokens (seq_len 16, budget 13); the only sentence start in A's half
    # is 5, so A = r[0:5]; B has room for 8; the negative jumps to 6 (the most an eighth of
    # 13 tokens allows).
    r = list(range(10, 27))
    out = objective("mlm_nsp", seq_len=16)(pair_batch(r, [5], 40))
    seqs, labels = unmasked(out), out["nsp_labels"]
    assert 0 < labels.sum() < 40
    for seq, label in zip(seqs.tolist(), labels.tolist(), strict=True):
        b0 = 6 if label else 5
        assert seq == [CLS, *r[0:5], SEP, *r[b0 : b0 + 8], SEP]
    assert out["token_type_ids"][0].tolist() == [0] * 7 + [1] * 9
    assert out["attention_mask"].all()


def test_nsp_negative_comes_from_the_other_document_by_hand():
    # Documents r[0:10] and r[11:17] around an <eos>: A = r[0:3] (sentence start 3), the
    # continuation could run 7 tokens but the other document holds 6, so B = 6 tokens either
    # way and the sequence is padded by 4.
    r = list(range(10, 27))
    r[10] = EOS
    out = objective("mlm_nsp", seq_len=16)(pair_batch(r, [3, 11], 40))
    labels = out["nsp_labels"]
    assert 0 < labels.sum() < 40
    for seq, label in zip(unmasked(out).tolist(), labels.tolist(), strict=True):
        b = r[11:17] if label else r[3:9]
        assert seq == [CLS, *r[0:3], SEP, *b, SEP] + [PAD] * 4
    assert out["token_type_ids"][0].tolist() == [0] * 5 + [1] * 7 + [0] * 4
    assert out["attention_mask"][0].tolist() == [True] * 12 + [False] * 4


def test_sop_structure_by_hand():
    r = list(range(10, 27))
    out = objective("mlm_sop", seq_len=16)(pair_batch(r, [4], 40))
    labels = out["nsp_labels"]
    assert 0 < labels.sum() < 40
    a, b = r[0:4], r[4:13]
    for seq, types, label in zip(
        unmasked(out).tolist(), out["token_type_ids"].tolist(), labels.tolist(), strict=True
    ):
        first, second = (b, a) if label else (a, b)
        assert seq == [CLS, *first, SEP, *second, SEP]
        assert types == [0] * (len(first) + 2) + [1] * (len(second) + 1)


@pytest.mark.parametrize("name", ["mlm_nsp", "mlm_sop"])
def test_pair_labels_are_balanced_and_follow_pair_swap_prob(name):
    batch = text_rows(1000, 64, eos_every=50)
    labels = objective(name, seq_len=64)(batch)["nsp_labels"].float()
    assert abs(labels.mean().item() - 0.5) < 0.05
    labels = objective(name, seq_len=64, pair_swap_prob=0.2)(batch)["nsp_labels"].float()
    assert abs(labels.mean().item() - 0.2) < 0.04


@pytest.mark.parametrize("name", ["mlm_nsp", "mlm_sop"])
def test_pairs_hold_no_eos_and_two_segments(name):
    out = objective(name, seq_len=64)(text_rows(200, 64, eos_every=23))
    seqs = unmasked(out)
    assert not (seqs == EOS).any()
    assert ((seqs == SEP).sum(1) == 2).all() and (seqs[:, 0] == CLS).all()


@pytest.mark.parametrize("name", ["mlm_nsp", "mlm_sop"])
def test_rows_without_room_for_a_pair_are_not_scored(name):
    rows = torch.full((2, 17), EOS)
    rows[0, :2] = torch.tensor([65, 66])  # one 2-token document, nothing beside it
    batch = {"tokens": rows, "sample_ids": torch.arange(2)}
    out = objective(name, seq_len=16)(batch)
    if name == "mlm_nsp":
        assert out["nsp_labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
        assert unmasked(out)[0, :5].tolist() == [CLS, 65, SEP, 66, SEP]
    else:  # two tokens still make two segments whose order can be swapped
        assert out["nsp_labels"][1] == IGNORE_INDEX and out["nsp_labels"][0] != IGNORE_INDEX
    assert unmasked(out)[1, :3].tolist() == [CLS, SEP, SEP]


def test_nsp_lengths_do_not_depend_on_the_label():
    batch = text_rows(1, 127, eos_every=70)
    sent = batch["sent_start"][0].numpy() | batch["doc_start"][0].numpy()
    pieces = [(0, 70), (71, 128)]
    for i in range(50):
        layouts = [
            nsp_layout(sample_rng(0, i), pieces, sent, budget=125, negative_prob=p)
            for p in (0.0, 1.0)
        ]
        (pos, label0), (neg, label1) = layouts
        assert (label0, label1) == (0, 1)
        assert pos[0] == neg[0]
        assert pos[1][1] - pos[1][0] == neg[1][1] - neg[1][0]
        assert pos[1][0] == pos[0][1] and neg[1][0] >= 71


def test_document_attention_for_mlm():
    batch = text_rows(2, 32, eos_every=10)
    batch["doc_start"][:, 11::10] = True
    cfg = DataConfig(document_attention=True)
    out = MaskedLM("mlm", cfg=cfg, tokenizer=TOK, seq_len=32, seed=0)(batch)
    # [CLS] + row tokens 0..29 + [SEP]; documents start at row 11 and 21 = sequence 12 and 22.
    assert out["position_ids"][0].tolist() == list(range(12)) + list(range(10)) + list(range(10))
    mask = out["attn_mask"][0, 0]
    assert mask.shape == (32, 32)
    assert mask[0, 11] and not mask[0, 12] and mask[12, 21] and not mask[21, 22]
    with pytest.raises(ValueError, match="document_attention"):
        MaskedLM("mlm_nsp", cfg=cfg, tokenizer=TOK, seq_len=32, seed=0)


# ---- configuration ------------------------------------------------------------------------


def test_registry_builds_the_objective():
    obj = build_objective("mlm_sop", cfg=DataConfig(), tokenizer=TOK, seq_len=32, seed=0)
    assert isinstance(obj, MaskedLM) and obj.name == "mlm_sop"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("unit", "sentence"),
        ("mask_prob", 0.0),
        ("replace_with_random", 0.3),
        ("span_max", 0),
        ("pair_swap_prob", 1.5),
    ],
)
def test_bad_config_is_named(field, value):
    with pytest.raises(ValueError, match=f"data.mlm.{field}"):
        objective(**{field: value})


def test_bad_batch_is_named():
    with pytest.raises(ValueError, match="seq_len"):
        objective(seq_len=32)(text_rows(2, 40))
    batch = text_rows(2, 32)
    batch["sent_start"] = batch["sent_start"][:, :5]
    with pytest.raises(ValueError, match="sent_start"):
        objective(seq_len=32)(batch)


def test_every_reserved_token_is_special():
    obj = objective()
    assert all(obj.is_special[SP[t]] for t in SPECIAL_TOKENS)
    assert not obj.is_special[:256].any()
    assert len(obj.random_ids) == 256


# ---- RoBERTa (roberta_* recipes): FULL-SENTENCES rows, dynamic masking over epochs -----------


class _KeepIds:
    """The objective, with each row's global sample id kept beside its output."""

    def __init__(self, obj: MaskedLM):
        self.obj = obj

    def __call__(self, batch: dict) -> dict:
        return {**self.obj(batch), "sample_ids": batch["sample_ids"]}


@pytest.fixture(scope="module")
def roberta_epochs(tmp_path_factory) -> tuple[list[dict], int, HFTokenizer]:
    """The mlm rows of a tiny byte-level BPE corpus (RoBERTa's kind of tokenizer) read through
    the loader for a little over two epochs: one record per sample, with its stored row and
    epoch."""
    from data_pipeline.loader import build_loader
    from data_pipeline.prepare import prepare_corpus
    from tests.unit.test_dataset import random_docs

    path = tmp_path_factory.mktemp("roberta") / "corpus"
    prepare_corpus(
        random_docs(80, seed=5), path, tokenizer_spec="bpe:400", seq_len=63, val_fraction=0.0
    )
    loader = build_loader(
        [(str(path), 1.0)],
        global_batch_size=8,
        micro_batch_size=4,
        dp_rank=0,
        dp_size=1,
        seed=3,
        transform=None,
    )
    tok = loader.tokenizer
    obj = MaskedLM("mlm", cfg=DataConfig(), tokenizer=tok, seq_len=63, seed=3)
    loader.transform = _KeepIds(obj)
    n = len(loader.datasets[0])
    records = []
    for _ in range(-(-2 * n // 8) + 1):
        for micro in loader.next_batch():
            g = micro["sample_ids"].numpy()
            source, k = loader.samples.locate(g)
            rows = loader.samples.rows(0, k)
            for i in range(len(g)):
                records.append(
                    {
                        "id": int(g[i]),
                        "row": int(rows[i]),
                        "epoch": int(k[i]) // n,
                        "tokens": unmasked(micro)[i],
                        **{key: micro[key][i] for key in ("input_ids", "labels")},
                        "attention_mask": micro["attention_mask"][i],
                    }
                )
    assert loader.epoch >= 2 and len({r["id"] for r in records}) == len(records)
    return records, n, tok


def test_roberta_rows_run_across_documents_with_eos_between_them(roberta_epochs):
    """FULL-SENTENCES: [CLS] row [SEP], the row packed across documents with <eos> between
    them, no padding and attention across the boundaries (no document mask or positions)."""
    records, _, tok = roberta_epochs
    eos, special = tok.special_tokens["<eos>"], set(tok.special_tokens.values())
    crossing = 0
    for r in records:
        seq = r["tokens"]
        assert seq[0] == tok.special_tokens["[CLS]"] and seq[-1] == tok.special_tokens["[SEP]"]
        assert r["attention_mask"].all()
        inner = seq[1:-1]
        at = torch.nonzero(inner == eos).flatten().tolist()
        assert set(inner.tolist()) & special <= {eos}  # the only special token inside a row
        crossing += any(0 < i < len(inner) - 1 and inner[i + 1] != eos for i in at)
        assert (r["labels"][seq == eos] == IGNORE_INDEX).all()  # separators are never masked
    assert crossing > len(records) // 2  # most rows hold the end of one document and the next


def _content(tokens: torch.Tensor, tok) -> torch.Tensor:
    return ~torch.isin(tokens, torch.tensor(list(tok.special_tokens.values())))


def _within_4_sigma(count: float, mean: float, var: float) -> bool:
    return abs(count - mean) <= 4 * var**0.5


def test_a_row_read_again_in_the_next_epoch_gets_a_new_mask(roberta_epochs):
    """Dynamic masking: the same stored row, read in epochs 0 and 1 under different global
    sample ids, gives the same tokens with different masked positions, and the two masks
    overlap as independent draws do (hypergeometric, within 4 sigma)."""
    records, n, tok = roberta_epochs
    by_row: dict[int, dict[int, dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], {}).setdefault(r["epoch"], r)
    pairs = [(e[0], e[1]) for e in by_row.values() if 0 in e and 1 in e]
    assert len(pairs) == n  # every row was read in both epochs
    overlap, mean, var = 0, 0.0, 0.0
    for first, second in pairs:
        assert first["id"] != second["id"]
        assert torch.equal(first["tokens"], second["tokens"])
        a, b = first["labels"] != IGNORE_INDEX, second["labels"] != IGNORE_INDEX
        assert a.sum() == b.sum() and not torch.equal(a, b)
        k, m = int(a.sum()), int(_content(first["tokens"], tok).sum())
        overlap += int((a & b).sum())
        mean += k * k / m
        var += k * (k / m) * ((m - k) / m) * ((m - k) / (m - 1))
    assert _within_4_sigma(overlap, mean, var), (overlap, mean, var)


def test_roberta_masking_rates_are_within_binomial_bounds(roberta_epochs):
    """Every row predicts round(15%) of its content tokens; of those, [MASK] / a random token /
    the token itself follow 80/10/10 within 4 binomial sigmas (a random pick equals the token
    with probability 1 / |non-special ids|), over every read of every epoch."""
    records, _, tok = roberta_epochs
    mask_id = tok.special_tokens["[MASK]"]
    n_random_ids = tok.vocab_size - len(tok.special_tokens)
    counts = {"mask": 0, "random": 0, "kept": 0}
    for r in records:
        chosen = r["labels"] != IGNORE_INDEX
        assert int(chosen.sum()) == max(1, round(0.15 * int(_content(r["tokens"], tok).sum())))
        inputs, labels = r["input_ids"][chosen], r["labels"][chosen]
        counts["mask"] += int((inputs == mask_id).sum())
        counts["kept"] += int((inputs == labels).sum())
        counts["random"] += int(((inputs != mask_id) & (inputs != labels)).sum())
        assert _content(inputs[inputs != mask_id], tok).all()  # random picks are never special
    total = sum(counts.values())
    probs = {
        "mask": 0.8,
        "random": 0.1 * (1 - 1 / n_random_ids),
        "kept": 0.1 + 0.1 / n_random_ids,
    }
    for key, p in probs.items():
        assert _within_4_sigma(counts[key], total * p, total * p * (1 - p)), (key, counts)
