"""Corpus readers on fixtures in the published layouts, and masked-LM adaptation on real IU reports
(on two processes under accelerate launch: tests/library/test_engine.py)."""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import tarfile

import pytest
import torch

from fasttextdiff.config import TextConfig
from fasttextdiff.data.corpora import (
    CorpusError,
    clean_note,
    iter_corpus,
    iter_iu_xray,
    iter_mimic_iii,
    iter_mimic_iv,
    iter_txt_folder,
    iu_xray_path,
)
from fasttextdiff.utils.errors import ModelNotFoundError
from fasttextdiff.text.encoder import TextEncoder, minilm_dir
from fasttextdiff.training.text_mlm import (
    add_pretrain_text_arguments,
    masked_perplexity,
    pack_blocks,
    pretrain_text,
    run_pretrain_text,
)

TINY = dict(max_seq_len=64, batch_size=8, hidden=32, layers=2, heads=2, vocab_size=600, max_notes=400,
            max_eval_blocks=8, lr=5e-3, tokenizer="wordpiece")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTEXTDIFF_CACHE", str(tmp_path / "user_cache"))


def _write_csv(path, header, rows, gz=False):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_clean_note_replaces_deid_brackets():
    raw = "Pt seen at [**Hospital 123**] on [**2101-3-4**].\n\n\nNo   effusion."
    assert clean_note(raw) == "Pt seen at XXXX on XXXX.\nNo effusion."


def test_mimic_iii_noteevents_stream_and_category_filter(tmp_path):
    long_text = "Findings: " + "clear lungs. " * 20_000  # beyond csv's default 128 kB field limit
    rows = [
        [1, "Radiology", "CHEST (PA & LAT)\n\nNo [**Name (NI) 45**] pneumothorax."],
        [2, "Nursing", "Patient resting."],
        [3, "Discharge summary", long_text],
        [4, "Radiology", "   "],
    ]
    path = _write_csv(tmp_path / "NOTEEVENTS.csv.gz", ["ROW_ID", "CATEGORY", "TEXT"], rows, gz=True)
    notes = list(iter_mimic_iii(tmp_path))  # the folder is accepted too
    assert len(notes) == 3 and notes[0] == "CHEST (PA & LAT)\nNo XXXX pneumothorax."
    assert len(notes[2]) > 200_000
    assert list(iter_mimic_iii(path, categories=["radiology"])) == [notes[0]]
    bad = _write_csv(tmp_path / "bad.csv", ["ROW_ID", "NOTE"], [[1, "x"]])
    with pytest.raises(CorpusError, match="no column 'TEXT'"):
        list(iter_mimic_iii(bad))


def test_mimic_iv_note_tables(tmp_path):
    (tmp_path / "note").mkdir()
    _write_csv(tmp_path / "note" / "discharge.csv.gz", ["note_id", "subject_id", "text"],
               [["10-DS-1", 10, "Discharge: stable. Seen by ___."]], gz=True)
    _write_csv(tmp_path / "radiology.csv", ["note_id", "subject_id", "text"],
               [["10-RR-1", 10, "EXAMINATION: CHEST. IMPRESSION: No acute process."]])
    assert list(iter_mimic_iv(tmp_path)) == ["Discharge: stable. Seen by ___.",
                                             "EXAMINATION: CHEST. IMPRESSION: No acute process."]
    assert len(list(iter_corpus("mimic-iv", tmp_path / "radiology.csv"))) == 1
    with pytest.raises(CorpusError, match="holds none"):
        list(iter_mimic_iv(tmp_path / "note" / "..", tables=("ecg",)))


def test_txt_folder_and_missing_paths(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "2.txt").write_text("Second [**Doctor**] note.")
    (tmp_path / "1.txt").write_text("First note.")
    assert list(iter_txt_folder(tmp_path)) == ["First note.", "Second XXXX note."]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        list(iter_txt_folder(tmp_path / "empty"))
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_txt_folder(tmp_path / "missing"))
    with pytest.raises(CorpusError, match="needs --path"):
        iter_corpus("txt")
    with pytest.raises(CorpusError, match="unknown corpus"):
        iter_corpus("pubmed", tmp_path)


def test_iu_xray_reports_real_and_extracted(tmp_path):
    notes = list(iter_iu_xray())
    assert len(notes) > 3800  # 3,955 XML files; a few have neither FINDINGS nor IMPRESSION
    assert notes[0].startswith("The cardiac silhouette and mediastinum size are within normal limits")
    assert notes[0].endswith("Normal chest x-XXXX.")
    # the same layout extracted to a folder
    with tarfile.open(iu_xray_path()) as tar:
        member = tar.getmember("ecgen-radiology/1.xml")
        (tmp_path / "1.xml").write_bytes(tar.extractfile(member).read())
    assert list(iter_iu_xray(tmp_path)) == [notes[0]]


def test_pack_blocks_fill_every_position():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    notes = ["no effusion", "heart size normal", "lungs clear"] * 20
    blocks = list(pack_blocks(notes, tok, 16, batch=7))
    assert blocks and all(len(b) == 16 and b[0] == tok.cls_token_id for b in blocks)
    assert tok.pad_token_id not in sum(blocks, [])
    assert sum(b.count(tok.sep_token_id) for b in blocks) >= 50  # notes are separated by [SEP]


def test_pretrain_improves_perplexity_loads_as_encoder_and_resumes(tmp_path):
    out = tmp_path / "adapted"
    seen: list[int] = []

    def stop_after_checkpoint(record):
        seen.append(record["step"])
        if record["step"] == 21:
            raise KeyboardInterrupt  # simulate a killed job right after the step-20 checkpoint

    with pytest.raises(KeyboardInterrupt):
        pretrain_text("iu-xray", None, "tiny", out, steps=40, checkpoint_every=20, progress=False,
                      log=stop_after_checkpoint, **TINY)
    assert json.loads((tmp_path / "adapted.resume" / "state.json").read_text(encoding="utf-8"))["step"] == 20
    seen.clear()
    metrics = pretrain_text("iu-xray", None, "tiny", out, steps=40, checkpoint_every=20, progress=False,
                            log=lambda r: seen.append(r["step"]), **TINY)
    assert seen[0] == 21 and seen[-1] == 40  # resumed, not restarted
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in ("perplexity_before", "perplexity_after", "steps", "seconds", "tokens"):
        assert key in saved
    assert saved["steps"] == 40 and saved["tokens"] == 40 * 8 * 64
    assert saved["perplexity_after"] < saved["perplexity_before"] / 2
    assert not (tmp_path / "adapted.resume").exists() and not (out / "checkpoint").exists()

    enc = TextEncoder(TextConfig(encoder=str(out)))  # the output is a text encoder as it is
    assert type(enc.model).__name__ == "ModernBertModel" and enc.hidden_size == 32
    assert enc.context_length == 8192
    batch = enc.encode(["No acute cardiopulmonary abnormality.", ""])
    assert batch.mask.sum(1).tolist()[1] == 2 and torch.isfinite(batch.states).all()

    # a finished run with the same settings is not redone
    again = pretrain_text("iu-xray", None, "tiny", out, steps=40, progress=False, **TINY)
    assert again["perplexity_after"] == metrics["perplexity_after"]


def test_masked_perplexity_is_reproducible():
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    cfg = ModernBertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, pad_token_id=0, cls_token_id=101, sep_token_id=102)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg)
    blocks = list(pack_blocks(["no focal consolidation or effusion"] * 40, tok, 32))
    a = masked_perplexity(model, tok, blocks, 0.3, seed=5, device=torch.device("cpu"))
    b = masked_perplexity(model, tok, blocks, 0.3, seed=5, device=torch.device("cpu"))
    c = masked_perplexity(model, tok, blocks, 0.3, seed=6, device=torch.device("cpu"))
    assert a == b and a != c and a[0] > 1


def test_bad_settings_and_inits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mlm_probability"):
        pretrain_text("iu-xray", None, "tiny", tmp_path / "x", mlm_probability=0.5, progress=False)
    with pytest.raises(ModelNotFoundError, match="bert model"):
        pretrain_text("iu-xray", None, str(minilm_dir()), tmp_path / "y", steps=1, progress=False)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        pretrain_text("iu-xray", None, str(tmp_path), tmp_path / "z", steps=1, progress=False)


def test_cli_arguments_run(tmp_path, capsys):
    parser = add_pretrain_text_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--corpus", "iu-xray", "--init", "tiny", "--out", str(tmp_path / "cli"),
                              "--steps", "3", "--max-seq-len", "32", "--batch-size", "4", "--hidden", "32",
                              "--layers", "2", "--tokenizer", "minilm", "--max-notes", "120"])
    assert args.path is None and args.quick is False and args.resume is True
    assert run_pretrain_text(args) == 0
    assert "perplexity" in capsys.readouterr().out
    settings = json.loads((tmp_path / "cli" / "metrics.json").read_text(encoding="utf-8"))["settings"]
    assert settings["tokenizer"] == "minilm" and settings["steps"] == 3
