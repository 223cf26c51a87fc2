"""Whole-word and span masking for MLM adaptation, on the real MiniLM WordPiece vocabulary and a BPE
vocabulary trained with `tokenizers` (the two kinds pretrain-text uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttextdiff.training.span_masking import WordSpanCollator, word_start_flags

NOTE = ("There is patchy airspace opacity in the right upper lobe and lingula, concerning for pneumonia. "
        "Costophrenic angles are sharp. Cardiomediastinal silhouette is unremarkable. Degenerative changes "
        "of the thoracic spine. No pneumothorax or pleural effusion. ") * 3


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from fasttextdiff.text.encoder import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from fasttextdiff.training.text_mlm import train_corpus_tokenizer

    notes = [NOTE, "Heart size is normal. The lungs are clear.", "Right basilar atelectasis."] * 20
    out = train_corpus_tokenizer(notes, tmp_path_factory.mktemp("bpe"), "bpe", 300)
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def _block(tokenizer) -> list[int]:
    return tokenizer(NOTE)["input_ids"]  # [CLS] ... [SEP]


def _words(tokenizer, ids):
    starts = word_start_flags(tokenizer)
    special = set(tokenizer.all_special_ids)
    words = []
    for pos, tok in enumerate(ids):
        if tok in special:
            continue
        if starts[tok] or not words or words[-1][-1] != pos - 1:
            words.append([pos])
        else:
            words[-1].append(pos)
    return words


@pytest.mark.parametrize("kind", ["minilm", "bpe"])
def test_whole_words_are_masked_together(kind, minilm_tokenizer, bpe_tokenizer):
    tokenizer = minilm_tokenizer if kind == "minilm" else bpe_tokenizer
    ids = _block(tokenizer)
    words = _words(tokenizer, ids)
    assert any(len(w) > 1 for w in words)  # some words are split into pieces
    collator = WordSpanCollator(tokenizer, mlm_probability=0.3, seed=0)
    batch = collator([{"input_ids": ids}] * 16)
    labels = batch["labels"]
    assert batch["input_ids"].shape == labels.shape == (16, len(ids))
    special = torch.tensor([t in set(tokenizer.all_special_ids) for t in ids])
    assert not (labels[:, special] != -100).any()  # [CLS]/[SEP] never masked
    for row in labels:
        for word in words:
            masked = [bool(row[p] != -100) for p in word]
            assert all(masked) or not any(masked)  # a word is masked whole or not at all
        assert (row[row != -100] == torch.tensor(ids)[row != -100]).all()  # labels are the original ids
    share = float((labels != -100).sum()) / (16 * int((~special).sum()))
    assert 0.27 <= share <= 0.4
    replaced = (batch["input_ids"] == tokenizer.mask_token_id) & (labels != -100)
    assert 0.65 < float(replaced.sum()) / float((labels != -100).sum()) < 0.95  # about 80 % become [MASK]


def test_span_masking_masks_runs_of_words(minilm_tokenizer):
    ids = _block(minilm_tokenizer)
    words = _words(minilm_tokenizer, ids)

    def mean_run(mean_span_words):
        collator = WordSpanCollator(minilm_tokenizer, 0.3, mean_span_words=mean_span_words, seed=1)
        runs = []
        for row in collator([{"input_ids": ids}] * 32)["labels"]:
            flags = [bool(row[w[0]] != -100) for w in words]
            length = 0
            for f in flags + [False]:
                if f:
                    length += 1
                elif length:
                    runs.append(length)
                    length = 0
        return np.mean(runs)

    assert mean_run(3.0) > mean_run(1.0) + 0.5


def test_masking_is_deterministic_by_seed(minilm_tokenizer):
    ids = _block(minilm_tokenizer)
    a = WordSpanCollator(minilm_tokenizer, 0.3, 3.0, seed=5)([{"input_ids": ids}] * 4)
    b = WordSpanCollator(minilm_tokenizer, 0.3, 3.0, seed=5)([{"input_ids": ids}] * 4)
    c = WordSpanCollator(minilm_tokenizer, 0.3, 3.0, seed=6)([{"input_ids": ids}] * 4)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])


@pytest.mark.parametrize("kwargs", [{"mlm_probability": 0.0}, {"mlm_probability": 1.0}, {"mean_span_words": 0.5}])
def test_collator_refuses_bad_settings(minilm_tokenizer, kwargs):
    with pytest.raises(ValueError):
        WordSpanCollator(minilm_tokenizer, **{"mlm_probability": 0.3, **kwargs})


def test_pretrain_settings_check_masking():
    from fasttextdiff.training.text_mlm import PretrainSettings

    PretrainSettings(masking="span").validate()
    with pytest.raises(ValueError, match="masking"):
        PretrainSettings(masking="phrase").validate()
