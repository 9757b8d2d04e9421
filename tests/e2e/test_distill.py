"""Distillation as a user runs it: a BERT teacher trained by launch/train.py, then DistilBERT
and TinyBERT students distilled from it (+distill=..., distill.teacher=RUN): the losses
fall, the teacher never enters the student's checkpoints, a resumed student continues
exactly, and a teacher exported to Hugging Face gives the same run as the Loom one."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ROOT, read_metrics

# The teacher: bert_debug, 4 layers (the students have 2), saved at its last step.
TEACHER = (
    "+model=bert_debug",
    "model.n_layer=4",
    "trainer.max_steps=12",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.save_every=12",
    "trainer.eval_every=0",
    "optim.lr=3e-3",
)
STUDENT = [
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=3",
    "trainer.eval_samples=6",
    "trainer.save_every=3",
    "trainer.max_steps=6",
    "optim.warmup_steps=2",
]


def student_overrides(kind: str, teacher: Path, *extra: str) -> tuple[str, ...]:
    """A short run of the distilbert_debug or tinybert_debug student with its paper's mix."""
    return (
        f"+model={kind}_debug",
        f"+distill={kind}",
        f"distill.teacher={teacher}",
        *STUDENT,
        *extra,
    )


LONGER = ["trainer.max_steps=20", "trainer.log_every=5", "trainer.eval_every=0", "optim.lr=3e-3"]


def test_distilbert_student_learns_from_its_teacher(one_process, train_cli, tmp_path):
    teacher = one_process(*TEACHER)
    proc = train_cli(
        *student_overrides("distilbert", teacher, *LONGER), f"trainer.out_dir={tmp_path}"
    )
    assert "student initialised from the teacher" in proc.stdout + proc.stderr
    assert "distilling from teacher" in proc.stdout + proc.stderr
    records = read_metrics(tmp_path)
    for r in records:  # 2 x MLM + 5 x soft targets + 1 x cosine
        want = 2 * r["loss_lm"] + 5 * r["loss_kd"] + r["loss_cos"]
        assert abs(r["loss"] - want) < 1e-4, r
    first, last = records[0], records[-1]
    for key in ("loss", "loss_kd", "loss_cos"):
        assert last[key] < first[key], (key, first[key], last[key])
    from tests.conftest import final_weights

    names = set(final_weights(tmp_path))
    assert not any("teacher" in n or "distill_proj" in n for n in names)
    assert len([n for n in names if n.startswith("blocks.")]) == 2 * 12  # two blocks


def test_tinybert_student_learns_through_projections(one_process, train_cli, tmp_path):
    teacher = one_process(*TEACHER)
    train_cli(*student_overrides("tinybert", teacher, *LONGER), f"trainer.out_dir={tmp_path}")
    records = read_metrics(tmp_path)
    first, last = records[0], records[-1]
    for key in ("loss", "loss_emb", "loss_hid", "loss_att", "loss_kd"):
        assert last[key] < first[key], (key, first[key], last[key])
    from tests.conftest import final_weights

    names = set(final_weights(tmp_path))
    assert {"distill_proj.hidden.weight", "distill_proj.embedding.weight"} <= names


def test_resumed_student_continues_exactly(one_process, train_cli, tmp_path):
    """Stopped at step 3 and restarted, the student logs what an uninterrupted run does
    (the teacher is read again from distill.teacher)."""
    teacher = one_process(*TEACHER)
    whole = one_process(*student_overrides("distilbert", teacher))
    out = tmp_path / "resumed"
    train_cli(
        *student_overrides("distilbert", teacher, "trainer.max_steps=3"), f"trainer.out_dir={out}"
    )
    train_cli(*student_overrides("distilbert", teacher), f"trainer.out_dir={out}")
    a, b = read_metrics(whole), read_metrics(out)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        key = "loss" if "loss" in x else "val_loss"
        assert x[key] == y[key], (x["step"], key)


def test_teacher_from_a_hugging_face_folder_gives_the_same_run(one_process, train_cli, tmp_path):
    """The teacher exported with launch/export_hf.py (BertForPreTraining) and read back from
    that folder teaches as the Loom run does."""
    import subprocess
    import sys

    teacher = one_process(*TEACHER)
    hf_dir = tmp_path / "hf_teacher"
    subprocess.run(
        [
            sys.executable,
            "launch/export_hf.py",
            "--checkpoint",
            str(teacher),
            "--output",
            str(hf_dir),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    loom = one_process(*student_overrides("distilbert", teacher))
    out = tmp_path / "from_hf"
    train_cli(*student_overrides("distilbert", hf_dir), f"trainer.out_dir={out}")
    a, b = read_metrics(loom), read_metrics(out)
    for x, y in zip(a, b, strict=True):
        key = "loss" if "loss" in x else "val_loss"
        assert abs(x[key] - y[key]) < 1e-4, (x["step"], key, x[key], y[key])
