"""NEZHA: functional relative position encoding (position=relative_sinusoidal) against a direct
implementation of the formula, its clipping, its fixed table, its translation invariance, the
recipes' sizes and FLOPs, the dry run and the refused Hugging Face export."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import ConfigError
from models import ModelConfig, build_model, flops_per_token, param_counts
from models.blocks import (
    MultiHeadAttention,
    RelativePositions,
    RelativeSinusoidal,
    relative_attention,
    relative_index,
    relative_sinusoid_table,
)

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf" / "model"
VOCAB = 366  # the byte tokenizer's


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(name: str, **overrides) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    return dataclasses.replace(cfg, **overrides)


def debug_nezha(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = load("nezha_debug", **overrides)
    return build_model(cfg, vocab_size=cfg.padded_vocab_size(VOCAB)).eval()


# ---- the formula, written out independently --------------------------------------------


def pair_table(t: int, k: int, head_dim: int, *, offset: int) -> torch.Tensor:
    """The (T, T, K) float64 table of every (query i, key j) pair, entry by entry:
    a_ij[2c] = sin(x / 10000^(2c/K)), a_ij[2c+1] = cos(x / 10000^(2c/K)) with
    x = clip(j - i, -k, k) + offset (offset 0: the paper's formula; k: NEZHA's released code)."""
    a = torch.zeros(t, t, head_dim, dtype=torch.float64)
    for i in range(t):
        for j in range(t):
            x = max(-k, min(k, j - i)) + offset
            for c in range(head_dim // 2):
                wavelength = 10000 ** (2 * c / head_dim)
                a[i, j, 2 * c] = math.sin(x / wavelength)
                a[i, j, 2 * c + 1] = math.cos(x / wavelength)
    return a


def reference_attention(q, k, v, a, allowed=None) -> torch.Tensor:
    """Shaw et al. 2018 as NEZHA uses it, in float64:
    e_ij = q_i . (k_j + a_ij) / sqrt(d);  z_i = sum_j softmax_j(e_ij) (v_j + a_ij)."""
    q, k, v = q.double(), k.double(), v.double()
    e = torch.einsum("bhik,bhjk->bhij", q, k) + torch.einsum("bhik,ijk->bhij", q, a)
    e = e / math.sqrt(q.shape[-1])
    if allowed is not None:
        e = e.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(e, dim=-1)
    return torch.einsum("bhij,bhjk->bhik", p, v) + torch.einsum("bhij,ijk->bhik", p, a)


def random_mask(b: int, t: int, *, seed: int) -> torch.Tensor:
    """(B, 1, T, T) boolean mask, padding at the end of row 1 plus random holes; every query
    keeps at least its own key."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.rand(b, 1, t, t, generator=gen) > 0.3
    allowed[1, :, :, t - 3 :] = False
    return allowed | torch.eye(t, dtype=torch.bool)


def test_attention_matches_the_formula_with_masks():
    """MultiHeadAttention with relative positions = the formula over the explicit (T, T, K)
    table, fp32 against float64, with masks and distances past the clip (T=13, k=4)."""
    b, t, d, h, k = 2, 13, 32, 4, 4
    head_dim = d // h
    torch.manual_seed(0)
    attn = MultiHeadAttention(d, h).eval()
    x_BTD = torch.randn(b, t, d)
    allowed = random_mask(b, t, seed=1)
    relative = RelativeSinusoidal(head_dim, max_relative_position=k)()
    ours = attn(x_BTD, attn_mask=allowed, relative=relative)

    with torch.no_grad():
        q, kk, v = attn.qkv(x_BTD).view(b, t, h, 3, head_dim).permute(3, 0, 2, 1, 4)
        z = reference_attention(q, kk, v, pair_table(t, k, head_dim, offset=k), allowed)
        expected = attn.out(z.transpose(1, 2).reshape(b, t, d).float())
    diff = (ours - expected).abs().max().item()
    assert diff < 1e-5, diff
    # The relative terms matter: without them the output is far off.
    assert (attn(x_BTD, attn_mask=allowed) - expected).abs().max() > 1e-2


def test_released_table_is_the_papers_rotated_per_channel_pair():
    """relative_sinusoid_table follows NEZHA's code (sinusoids of clip(j - i) + k); the
    paper's formula (sinusoids of clip(j - i)) gives the same attention once queries, keys
    and values are rotated by R^T and the output by R, R rotating channel pair (2c, 2c + 1)
    by k / 10000^(2c/K): the two describe the same models."""
    b, h, t, head_dim, k = 2, 3, 11, 8, 3
    gen = torch.Generator().manual_seed(2)
    q, kk, v = (torch.randn(b, h, t, head_dim, generator=gen, dtype=torch.float64) for _ in "qkv")
    table_PK, index = relative_index(
        RelativePositions(relative_sinusoid_table(k, head_dim).double()), t
    )
    ours = relative_attention(q, kk, v, table_PK=table_PK, index=index)

    rotation = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    for c in range(head_dim // 2):
        phi = k / 10000 ** (2 * c / head_dim)
        # (sin(x + phi), cos(x + phi)) = R (sin x, cos x)
        rotation[2 * c : 2 * c + 2, 2 * c : 2 * c + 2] = torch.tensor(
            [[math.cos(phi), math.sin(phi)], [-math.sin(phi), math.cos(phi)]],
            dtype=torch.float64,
        )
    paper = pair_table(t, k, head_dim, offset=0)
    released = pair_table(t, k, head_dim, offset=k)
    assert torch.allclose(paper @ rotation.T, released, atol=1e-12)
    back = reference_attention(q @ rotation, kk @ rotation, v @ rotation, paper) @ rotation.T
    assert (ours - back).abs().max() < 1e-6  # the table is float32, rounded once


def test_fixed_table_values():
    table = relative_sinusoid_table(64, 64)
    assert table.shape == (129, 64) and table.dtype == torch.float32
    p, c = 70, 5  # row 70: distance +6
    assert table[p, 2 * c].item() == pytest.approx(math.sin(p / 10000 ** (2 * c / 64)), abs=1e-7)
    assert table[p, 2 * c + 1].item() == pytest.approx(
        math.cos(p / 10000 ** (2 * c / 64)), abs=1e-7
    )


# ---- clipping ------------------------------------------------------------------------------


def test_index_clips_distances_to_k():
    t, k = 12, 3
    table_PK, index = relative_index(RelativePositions(relative_sinusoid_table(k, 4)), t)
    assert table_PK.shape == (2 * k + 1, 4)
    for i in range(t):
        for j in range(t):
            assert index[i, j] == max(-k, min(k, j - i)) + k
    # A row shorter than k + 1 tokens uses only the distances it can reach.
    short_PK, short = relative_index(RelativePositions(relative_sinusoid_table(8, 4)), 3)
    assert short_PK.shape == (5, 4) and torch.equal(short_PK, relative_sinusoid_table(8, 4)[6:11])
    assert short[0, 2] == 4 and short[2, 0] == 0


def test_keys_beyond_k_share_the_row_of_distance_k():
    """For query 0, the keys at distance >= k all get a_0j = a(k): permuting their contents
    leaves query 0's output unchanged; swapping across the clip (k - 1 and k) does not."""
    t, d, h, k = 14, 32, 4, 5
    torch.manual_seed(3)
    attn = MultiHeadAttention(d, h).eval()
    relative = RelativeSinusoidal(d // h, max_relative_position=k)()
    x_BTD = torch.randn(1, t, d)
    y = attn(x_BTD, relative=relative)[:, 0]
    far = list(range(k, t))
    shuffled = x_BTD.clone()
    shuffled[:, far] = x_BTD[:, far[::-1]]
    assert (attn(shuffled, relative=relative)[:, 0] - y).abs().max() < 1e-6
    across = x_BTD.clone()
    across[:, [k - 1, k]] = x_BTD[:, [k, k - 1]]
    assert (attn(across, relative=relative)[:, 0] - y).abs().max() > 1e-4


# ---- not learned; translation invariant ------------------------------------------------------


def test_positions_are_not_learned():
    """No position table and no tensor for the relative terms: the state dict is BERT's
    without wpe, and the count drops by exactly max_seq_len x d_model."""
    nezha = debug_nezha()
    bert = build_model(load("bert_debug"), vocab_size=VOCAB)
    assert nezha.wpe is None and list(nezha.buffers()) == []
    assert set(bert.state_dict()) - set(nezha.state_dict()) == {"wpe.weight"}
    assert set(nezha.state_dict()) <= set(bert.state_dict())
    delta = param_counts(bert)["total"] - param_counts(nezha)["total"]
    assert delta == 128 * 128
    out = nezha(torch.randint(0, VOCAB, (2, 20)))
    (out["logits"].sum() + out["nsp_logits"].sum()).backward()
    assert all(p.grad is not None for p in nezha.parameters())


def test_left_padding_shifts_nothing():
    """A sequence padded on the left (mask 0) gives, at its own tokens, the output it gives
    alone: only distances enter, not absolute positions. BERT's learned table fails it."""
    gen = torch.Generator().manual_seed(4)
    x_BT = torch.randint(0, VOCAB, (2, 15), generator=gen)
    pad = torch.randint(0, VOCAB, (2, 6), generator=gen)
    padded_BT = torch.cat([pad, x_BT], dim=1)
    mask_BT = torch.cat([torch.zeros(2, 6), torch.ones(2, 15)], dim=1).bool()
    for model, invariant in (
        (debug_nezha(), True),
        (build_model(load("bert_debug"), vocab_size=VOCAB).eval(), False),
    ):
        alone = model(x_BT)["logits"]
        shifted = model(padded_BT, attention_mask=mask_BT)["logits"][:, 6:]
        assert ((alone - shifted).abs().max() < 1e-4) == invariant


def test_position_ids_enter_only_through_their_differences():
    model = debug_nezha()
    x_BT = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    base = model(x_BT)["logits"]
    offset = torch.arange(20).expand(2, 20) + torch.tensor([[7], [30]])
    assert (model(x_BT, position_ids=offset)["logits"] - base).abs().max() < 1e-5
    # Packed documents: positions restart at 11 under a document mask, which keeps every
    # attended pair inside one document, so the row's distances are unchanged.
    restart = torch.cat([torch.arange(11), torch.arange(9)]).expand(2, 20)
    doc = torch.zeros(20, 20, dtype=torch.bool)
    doc[:11, :11] = doc[11:, 11:] = True
    packed = model(x_BT, position_ids=restart, attn_mask=doc)["logits"]
    assert (model(x_BT, attn_mask=doc)["logits"] - packed).abs().max() < 1e-5


def test_bf16_autocast_and_dropout_train():
    model = debug_nezha(dropout=0.1).train()
    x_BT = torch.randint(0, VOCAB, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_BT, labels=x_BT)
    (out["row_losses"].sum() + out["nsp_logits"].float().sum()).backward()
    assert torch.isfinite(out["row_losses"]).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---- config, recipes, sizes, FLOPs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 120, "n_head": 8}, r"model\.position=relative_sinusoidal needs an even"),
        ({"max_relative_position": 0}, r"model\.max_relative_position=0 must be >= 1"),
        (
            {"family": "gpt", "pre_ln": True, "type_vocab_size": 0},
            r"model\.position='relative_sinusoidal'.*family=gpt",
        ),
    ],
)
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load("nezha_debug", **overrides).validate()


@pytest.mark.parametrize(
    ("name", "expected", "bert_shape"),
    [
        ("nezha_base", 102_489_226, (12, 768, 12, 3072)),
        ("nezha_large", 326_072_970, (24, 1024, 16, 4096)),
    ],
)
def test_recipe_counts_are_hf_bert_minus_its_position_table(name, expected, bert_shape):
    transformers = pytest.importorskip("transformers")
    cfg = load(name)
    cfg.validate()
    assert (cfg.family, cfg.objective, cfg.position, cfg.max_relative_position) == (
        "bert",
        "mlm_nsp",
        "relative_sinusoidal",
        64,
    )
    layers, d, heads, ffn = bert_shape
    hf_cfg = transformers.BertConfig(
        vocab_size=21128,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=512,
        type_vocab_size=2,
    )
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
        hf = sum(p.numel() for p in transformers.BertForPreTraining(hf_cfg).parameters())
    assert ours == hf - 512 * d == expected


def test_flops_add_the_two_table_matmuls():
    cfg = load("nezha_base")
    learned = dataclasses.replace(cfg, position="learned")
    hk = 12 * 64
    for seq_len, rows in ((512, 129), (128, 129), (40, 79)):
        extra = flops_per_token(cfg, vocab_size=21128, seq_len=seq_len) - flops_per_token(
            learned, vocab_size=21128, seq_len=seq_len
        )
        assert extra == 8 * 12 * hk * rows


def test_dry_run_of_nezha_large(tmp_path):
    from tests.unit.test_config import compose_job
    from trainer.dry_run import dry_run

    job = compose_job("+model=nezha_large", "trainer.dry_run=true", f"trainer.out_dir={tmp_path}")
    report = dry_run(job, world_size=1)
    assert report["params_total"] == 326_072_970
    assert report["flops_per_token"] == flops_per_token(job.model, vocab_size=21128, seq_len=512)


# ---- Hugging Face export ------------------------------------------------------------------------


def test_export_refuses_nezha_in_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "launch" / "export_hf.py")
    export_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_hf)
    cfg = load("nezha_debug", vocab_size=VOCAB)
    step = tmp_path / "run" / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"model": dataclasses.asdict(cfg)}), tmp_path / "run" / "config.yaml"
    )
    torch.save(build_model(cfg, vocab_size=VOCAB).state_dict(), step / "model.pt")
    with pytest.raises(ConfigError, match="relative_sinusoidal.*no Nezha model"):
        export_hf.export_to_hf(step, tmp_path / "out")
    assert export_hf.main(["--checkpoint", str(step), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NEZHA" in err, err
    assert not (tmp_path / "out").exists()
