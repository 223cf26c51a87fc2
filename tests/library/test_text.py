"""TextEncoder on real (tiny, from-config) ModernBERT and BERT models and the real MiniLM weights."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch

from fasttextdiff.config import TextConfig
from fasttextdiff.utils.errors import CheckpointError, ModelNotFoundError, ReportError
from fasttextdiff.text.encoder import (
    TextBatch,
    TextEncoder,
    build_tiny_encoder,
    default_tiny_dir,
    minilm_dir,
    resolve_attn_implementation,
)

REPORT = "Bilateral pulmonary infection, two infected areas, upper left lung and upper right lung."
SHORT = "No acute cardiopulmonary abnormality."


@pytest.fixture(scope="module", autouse=True)
def user_cache(tmp_path_factory):
    """A private FASTTEXTDIFF_CACHE so the tiny encoder is built fresh, once, for this module."""
    old = os.environ.get("FASTTEXTDIFF_CACHE")
    root = tmp_path_factory.mktemp("user_cache")
    os.environ["FASTTEXTDIFF_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("FASTTEXTDIFF_CACHE", None)
    else:
        os.environ["FASTTEXTDIFF_CACHE"] = old


@pytest.fixture(scope="module")
def tiny():
    return TextEncoder(TextConfig(encoder="tiny"))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BertModel from config with a 64-position context, to exercise chunking quickly."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_attention_implementation_choice():
    assert resolve_attn_implementation("cpu") == "sdpa"
    import importlib.util

    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert resolve_attn_implementation("cuda") == expected


def test_tiny_encoder_is_deterministic_and_keeps_modernbert_layout(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    a = build_tiny_encoder(tmp_path / "a", seed=3)
    b = build_tiny_encoder(tmp_path / "b", seed=3)
    c = build_tiny_encoder(tmp_path / "c", seed=4)
    wa, wb, wc = ((p / "model.safetensors").read_bytes() for p in (a, b, c))
    assert wa == wb and wa != wc
    cfg = AutoConfig.from_pretrained(a, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(a, local_files_only=True)
    assert cfg.model_type == "modernbert" and cfg.max_position_embeddings == 8192
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    assert (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id) == (
        tok.pad_token_id, tok.cls_token_id, tok.sep_token_id)
    assert cfg.vocab_size == len(tok)


def test_default_tiny_dir_is_built_once(user_cache):
    first = default_tiny_dir()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert default_tiny_dir() == first and str(first).startswith(str(user_cache))
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_encode_shapes_mask_and_padding_invariance(tiny):
    assert tiny.hidden_size == 64 and tiny.context_length == 8192
    batch = tiny.encode([SHORT, REPORT])
    assert isinstance(batch, TextBatch)
    assert batch.states.dtype == torch.float32 and batch.mask.dtype == torch.bool
    n_short, n_long = batch.mask.sum(1).tolist()
    assert n_short < n_long == batch.states.shape[1]
    assert not batch.mask[0, n_short:].any() and torch.all(batch.states[0, n_short:] == 0)
    tiny.clear_memory_cache()
    alone = tiny.encode([SHORT])  # computed on its own: padding must not change the states
    torch.testing.assert_close(alone.states[0], batch.states[0, :n_short], atol=1e-5, rtol=1e-4)


def test_empty_and_whitespace_reports_fall_back_to_special_tokens(tiny):
    batch = tiny.encode(["", "   \n\t"])
    assert batch.mask.tolist() == [[True, True], [True, True]]
    torch.testing.assert_close(batch.states[0], batch.states[1])


@pytest.mark.parametrize("bad, message", [
    ([None], "must be a string"),
    ([b"bytes"], "must be a string"),
    ("a bare string", "list of report texts"),
])
def test_bad_input_raises_report_error(tiny, bad, message):
    with pytest.raises(ReportError, match=message):
        tiny.encode(bad)


def test_too_long_report_is_refused():
    enc = TextEncoder(TextConfig(encoder="tiny", max_chars=50))
    with pytest.raises(ReportError, match="report has 51 characters; the limit is 50"):
        enc.encode(["x" * 51])


def test_memory_cache_hits(tiny):
    tiny.clear_memory_cache()
    first = tiny.encode([REPORT, REPORT])
    computed = tiny.stats["computed"]
    hits = tiny.stats["memory_hits"]
    again = tiny.encode([REPORT])
    assert tiny.stats["computed"] == computed and tiny.stats["memory_hits"] == hits + 1
    torch.testing.assert_close(first.states[0], again.states[0])
    torch.testing.assert_close(first.states[0], first.states[1])


def test_disk_cache_survives_restart_and_repairs_corrupt_files(tmp_path, caplog):
    enc = TextEncoder(TextConfig(encoder="tiny"), cache_dir=tmp_path)
    ref = enc.encode([REPORT, SHORT])
    files = sorted((tmp_path / enc.identity).glob("*.safetensors"))
    assert len(files) == 2
    fresh = TextEncoder(TextConfig(encoder="tiny"), cache_dir=tmp_path)
    got = fresh.encode([REPORT, SHORT])
    assert fresh.stats["disk_hits"] == 2 and fresh.stats["computed"] == 0
    torch.testing.assert_close(got.states, ref.states)

    files[0].write_bytes(b"\x00garbage, not a safetensors header")
    third = TextEncoder(TextConfig(encoder="tiny"), cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fasttextdiff.text.encoder"):
        again = third.encode([REPORT, SHORT])
    assert third.stats["computed"] == 1 and third.stats["disk_hits"] == 1
    assert "corrupt" in caplog.text and REPORT not in caplog.text
    torch.testing.assert_close(again.states, ref.states)
    from safetensors.torch import load_file

    assert load_file(str(files[0]))["states"].shape[1] == 64  # rewritten, valid again


def test_disk_cache_is_bounded(tmp_path):
    enc = TextEncoder(TextConfig(encoder="tiny"), cache_dir=tmp_path, disk_cache_bytes=60_000)
    for i in range(12):
        enc.encode([f"{REPORT} case {i} " * 3])
    total = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    assert 0 < total <= 60_000
    assert len(list(tmp_path.rglob("*.safetensors"))) < 12


def test_identity_tracks_weights_not_location(tmp_path, tiny):
    copy = build_tiny_encoder(tmp_path / "same", seed=0)
    other = build_tiny_encoder(tmp_path / "other", seed=1)
    same_enc = TextEncoder(TextConfig(encoder=str(copy)))
    other_enc = TextEncoder(TextConfig(encoder=str(other)))
    assert same_enc.identity == tiny.identity
    assert other_enc.identity != tiny.identity
    assert not torch.allclose(other_enc.encode([SHORT]).states, tiny.encode([SHORT]).states)


def test_modernbert_truncates_beyond_its_context(caplog):
    enc = TextEncoder(TextConfig(encoder="tiny", max_length=32))
    secret = "pneumothorax " * 100
    with caplog.at_level(logging.WARNING, logger="fasttextdiff.text.encoder"):
        batch = enc.encode([secret])
    assert batch.states.shape[1] == 32 and enc.stats["truncated"] == 1
    assert "truncated" in caplog.text and "pneumothorax" not in caplog.text


def test_reference_truncation_keeps_ten_tokens_of_a_bert():
    """TextConfig(max_length=10, truncate=True): what the reference code did, kept for comparisons."""
    full = TextEncoder(TextConfig(encoder=str(minilm_dir())))
    cut = TextEncoder(TextConfig(encoder=str(minilm_dir()), max_length=10, truncate=True))
    assert cut.long_text == "truncate" and full.long_text == "chunk" and cut.identity != full.identity
    head = "Findings: the heart is normal in size and"  # 9 WordPiece tokens
    a, b = cut.encode([head + " the right upper lobe is clear.", head + " there is a left lower lobe opacity."]).states
    assert a.shape == b.shape == (10, full.hidden_size)  # [CLS] + 8 tokens + [SEP]
    torch.testing.assert_close(a, b)  # everything after the 8th token is cut
    assert full.encode([REPORT]).states.shape[1] > 10
    with pytest.raises(ValueError, match="max_length"):
        TextConfig(encoder="tiny", truncate=True)


def test_bert_chunks_long_reports_and_concatenates(tiny_bert_dir):
    enc = TextEncoder(TextConfig(encoder=str(tiny_bert_dir), chunk_overlap=8))
    assert enc.context_length == 64 and enc.long_text == "chunk"
    words = "lung " * 150  # one WordPiece token per word
    batch = enc.encode([words])
    assert batch.states.shape[1] == 152 and enc.stats["chunked"] == 1  # every token once + CLS/SEP
    # The first window is exactly the first 62 words; its kept part must match encoding them alone.
    first_window = enc.encode(["lung " * 62]).states[0]
    keep = 1 + 62 - 4  # CLS + content up to the middle of the 8-token overlap
    torch.testing.assert_close(batch.states[0, :keep], first_window[:keep])
    short = enc.encode([SHORT])
    assert enc.stats["chunked"] == 1 and short.mask.all()


def test_chunk_overlap_must_leave_room(tiny_bert_dir):
    with pytest.raises(ValueError, match="chunk_overlap"):
        TextEncoder(TextConfig(encoder=str(tiny_bert_dir), chunk_overlap=40))


def test_missing_encoders_give_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="--text-encoder DIR"):
        TextEncoder(TextConfig(encoder="no-such-org/no-such-model"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        TextEncoder(TextConfig(encoder=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        TextEncoder(TextConfig(encoder=str(tmp_path / "empty")))


def test_tiny_reference_is_bundled_and_reloads(tmp_path, tiny):
    model_dir = tmp_path / "model"
    tiny.save_reference(model_dir)
    assert (model_dir / "text_encoder.json").is_file()
    assert (model_dir / "text_encoder" / "model.safetensors").is_file()
    loaded = TextEncoder.from_model_dir(model_dir)
    assert loaded.identity == tiny.identity and loaded.source == str(model_dir / "text_encoder")
    assert loaded.config.encoder == "tiny"
    torch.testing.assert_close(loaded.encode([REPORT]).states, tiny.encode([REPORT]).states)


def test_reference_to_a_directory_and_its_failures(tmp_path):
    enc_dir = build_tiny_encoder(tmp_path / "enc", seed=2)
    enc = TextEncoder(TextConfig(encoder=str(enc_dir)))
    model_dir = tmp_path / "model"
    enc.save_reference(model_dir)
    assert not (model_dir / "text_encoder").exists()
    assert TextEncoder.from_model_dir(model_dir).identity == enc.identity
    build_tiny_encoder(enc_dir, seed=5)  # the encoder changed after training
    with pytest.raises(CheckpointError, match="differs"):
        TextEncoder.from_model_dir(model_dir)
    import shutil

    shutil.rmtree(enc_dir)
    with pytest.raises(ModelNotFoundError, match=str(enc_dir)):
        TextEncoder.from_model_dir(model_dir)
    with pytest.raises(ModelNotFoundError, match="text_encoder.json"):
        TextEncoder.from_model_dir(tmp_path)


def test_concurrent_encode_matches_serial(tmp_path):
    enc = TextEncoder(TextConfig(encoder="tiny"), cache_dir=tmp_path)
    texts = [f"{REPORT} {i}" for i in range(6)]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(k: int) -> None:
        try:
            results[k] = enc.encode(texts[k % 3 :] + texts[: k % 3]).states
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    serial = TextEncoder(TextConfig(encoder="tiny")).encode(texts).states
    for k, states in results.items():
        order = texts[k % 3 :] + texts[: k % 3]
        for row, text in enumerate(order):
            torch.testing.assert_close(states[row], serial[texts.index(text)], atol=1e-5, rtol=1e-4)


def test_real_minilm_weights_encode_and_chunk():
    enc = TextEncoder(TextConfig(encoder=str(minilm_dir())))
    assert enc.hidden_size == 384 and enc.context_length == 512 and enc.long_text == "chunk"
    batch = enc.encode([REPORT, "lung " * 600])
    assert batch.states.shape == (2, 602, 384)
    # Real pretrained weights: related reports are closer than unrelated text.
    a, b, c = (enc.encode([t]).states[0].mean(0) for t in (
        "No acute cardiopulmonary abnormality.", "No acute cardiopulmonary disease.",
        "The invoice total is due on Friday."))
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > cos(a, c, dim=0)


def test_split_sentences_keeps_sections_and_joins_list_numbers():
    from fasttextdiff.text.encoder import split_sentences

    text = ("EXAMINATION: Chest PA and lateral.\nFINDINGS: Heart size normal. RUL consolidation.\n"
            "IMPRESSION: 1. Pneumonia in the RUL. 2. No effusion.")
    assert split_sentences(text) == ["EXAMINATION: Chest PA and lateral.", "FINDINGS: Heart size normal.",
                                     "RUL consolidation.", "IMPRESSION: 1.", "Pneumonia in the RUL.",
                                     "2. No effusion."]
    assert split_sentences("   \n ") == [] and split_sentences("Clear.") == ["Clear."]


def test_focus_keeps_the_sentences_nearest_the_finding_in_report_order():
    """Real MiniLM weights: the sentence about the opacity survives among organ findings it resembles least."""
    focus = "Airspace opacity or consolidation in the right or left lung."
    enc = TextEncoder(TextConfig(encoder=str(minilm_dir()), focus=focus, focus_sentences=3))
    plain = TextEncoder(TextConfig(encoder=str(minilm_dir())))
    assert enc.identity != plain.identity
    report = ("EXAMINATION: Chest PA and lateral. FINDINGS: The heart size is within normal limits. "
              "Degenerative changes of the thoracic spine. There is patchy opacity in the right apex. "
              "The XXXX are intact. IMPRESSION: Right apical opacity, likely pneumonia.")
    kept = enc.focused(report)
    assert kept == ("EXAMINATION: Chest PA and lateral. There is patchy opacity in the right apex. "
                    "IMPRESSION: Right apical opacity, likely pneumonia.")  # heart, spine and bones dropped
    torch.testing.assert_close(enc.encode([report]).states, plain.encode([kept]).states)
    assert enc.focused("Opacity in the RUL.") == "Opacity in the RUL."  # short reports stay whole
    with pytest.raises(ValueError, match="focus"):
        TextConfig(encoder="tiny", focus="  ")
