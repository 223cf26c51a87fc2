"""Domain-adaptive masked-language-model pretraining of ModernBERT on clinical notes.

This is the step the FastTextDiff paper rests on: a ModernBERT adapted to clinical text encodes
reports better than a general one. `pretrain_text` continues a local ModernBERT checkpoint
(`init=DIR`) or starts a small one from scratch (`init="tiny"`, tokenizer trained on the corpus
or the MiniLM WordPiece vocabulary), packs notes into long sequences, masks 15-30 % of tokens
and trains with warmup + decay. Held-out masked-token perplexity is measured before and after
with a fixed masking seed, so the two figures compare like with like. The output directory is
a plain transformers checkpoint that `TextEncoder(TextConfig(encoder=out_dir))` loads directly.
A killed run resumes from ``<out_dir>.resume/`` under the one policy of `training.resume`.

It runs on the shared training engine: `accelerate launch --multi_gpu --num_processes N -m
fasttextdiff.commands.main pretrain-text ...` trains on N processes (nccl on GPUs, gloo on CPUs), each on its
share of the packed blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from fasttextdiff.utils.atomic import atomic_write_json, staging_dir
from fasttextdiff.utils.checkpoint import load_optimizer_state, optimizer_state_tensors, sha256_file
from fasttextdiff.data.corpora import CORPORA, iter_corpus
from fasttextdiff.training.engine import Engine, RunProgress
from fasttextdiff.training.resume import ResumeState
from fasttextdiff.utils.errors import CorpusError, ModelNotFoundError
from fasttextdiff.training.span_masking import MASKINGS, WordSpanCollator
from fasttextdiff.text.encoder import _quiet_transformers, build_tiny_encoder

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class PretrainSettings:
    """Everything that decides the run; recorded in metrics.json and, all but `checkpoint_every`, in the
    resume state: a state of other settings is not resumed (`training.resume`). `steps` and `epochs`
    count too: the learning-rate schedule decays over them."""

    corpus: str = "iu-xray"
    path: str | None = None
    init: str = "tiny"
    max_seq_len: int = 512  # packed block length (ModernBERT trains up to 8192; memory decides)
    mlm_probability: float = 0.30  # ModernBERT's own pretraining rate
    masking: str = "token"  # token | whole_word | span (spans of words, mean 3): span_masking.py
    steps: int | None = None  # None = `epochs` passes over the training blocks
    epochs: float = 1.0
    batch_size: int = 16  # blocks per step per process
    lr: float | None = None  # None: 1e-3 for a tiny model from scratch, 5e-5 to continue a checkpoint
    warmup: float = 0.06  # a fraction of the steps (< 1) or a number of steps
    schedule: str = "linear"  # linear | cosine decay after warmup
    weight_decay: float = 0.01
    seed: int = 0
    holdout: float = 0.05  # share of notes held out for perplexity (chosen by note hash)
    max_eval_blocks: int = 64
    tokenizer: str = "bpe"  # init tiny only: "bpe" (trained on the corpus), "wordpiece" or "minilm"
    vocab_size: int = 8192  # trained tokenizers
    tokenizer_notes: int = 200_000  # notes used to train the tokenizer (streams are long)
    hidden: int = 128  # init tiny only
    layers: int = 2
    heads: int = 4
    categories: tuple[str, ...] = ()  # MIMIC-III CATEGORY filter
    max_notes: int | None = None  # read at most this many notes (a quick look at a huge table)
    checkpoint_every: int = 200
    shuffle_buffer: int = 2048
    memory_tokens: int = 50_000_000  # small corpora stay tokenized in memory after the first epoch
    quick: bool = False

    def validate(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA}, got {self.corpus!r}")
        if not 0.15 <= self.mlm_probability <= 0.30:
            raise ValueError(f"mlm_probability must be within 0.15-0.30, got {self.mlm_probability}")
        if self.max_seq_len < 16:
            raise ValueError("max_seq_len must be at least 16 tokens")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.epochs <= 0 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if not 0 < self.holdout < 0.5:
            raise ValueError("holdout must be a fraction in (0, 0.5)")
        if self.tokenizer not in ("bpe", "wordpiece", "minilm"):
            raise ValueError("tokenizer must be bpe, wordpiece or minilm")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError("schedule must be linear or cosine")
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")


QUICK = dict(max_seq_len=128, batch_size=32, steps=240, hidden=128, layers=2, heads=4, vocab_size=4096,
             max_eval_blocks=48, checkpoint_every=150, lr=2e-3)


# --------------------------------------------------------------------------------------------
# data: split, tokenizer, packing


def _is_heldout(note: str, holdout: float) -> bool:
    """Stable split by content hash: the same note is held out in every run and on every rank."""
    return int(hashlib.sha256(note.encode("utf-8")).hexdigest()[:8], 16) % 10_000 < holdout * 10_000


def _notes(s: PretrainSettings, heldout: bool) -> Iterator[str]:
    count = 0
    for note in iter_corpus(s.corpus, s.path, s.categories or None):
        count += 1
        if s.max_notes is not None and count > s.max_notes:
            return
        if _is_heldout(note, s.holdout) == heldout:
            yield note


def train_corpus_tokenizer(notes: Iterable[str], out_dir: Path, kind: str, vocab_size: int) -> Path:
    """A BPE (ModernBERT's kind) or WordPiece tokenizer learned on the corpus, with BERT-style
    specials so the model's [CLS]/[SEP]/[MASK] ids line up; saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                            min_frequency=2, show_progress=False)
    tok.train_from_iterator(notes, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=8192)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def pack_blocks(notes: Iterable[str], tokenizer: Any, block_len: int, batch: int = 256) -> Iterator[list[int]]:
    """Concatenate notes, each closed by [SEP], and cut into blocks of `block_len` starting with
    [CLS]: no padding, so every position trains (the ModernBERT recipe). The tail is dropped."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    buf: list[int] = []
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        nonlocal buf
        for ids in tokenizer(pending, add_special_tokens=False, return_attention_mask=False)["input_ids"]:
            buf.extend(ids)
            buf.append(sep_id)
        pending.clear()
        while len(buf) >= block_len - 1:
            yield [cls_id] + buf[: block_len - 1]
            buf = buf[block_len - 1 :]

    for note in notes:
        pending.append(note)
        if len(pending) >= batch:
            yield from flush()
    yield from flush()


def _shuffled(blocks: Iterator[list[int]], buffer: int, seed: int) -> Iterator[list[int]]:
    """Streaming shuffle with a bounded buffer (the corpus may not fit in memory)."""
    rng = random.Random(seed)
    pool: list[list[int]] = []
    for block in blocks:
        pool.append(block)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


# --------------------------------------------------------------------------------------------
# model, optimizer state, perplexity


def _load_init_model(s: PretrainSettings, out_dir: Path, engine: Engine,
                     notes_for_tokenizer: Callable[[], Iterable[str]]):
    from transformers import AutoConfig, AutoTokenizer, ModernBertForMaskedLM

    if s.init == "tiny":
        tok_dir = out_dir / ".work" / "tokenizer"
        if s.tokenizer == "minilm":
            tok_src: Path | str = "minilm"
        else:
            if engine.is_main and not (tok_dir / "tokenizer.json").is_file():
                limited = (n for i, n in enumerate(notes_for_tokenizer()) if i < s.tokenizer_notes)
                train_corpus_tokenizer(limited, tok_dir, s.tokenizer, s.vocab_size)
            engine.wait()
            tok_src = tok_dir
        init_dir = out_dir / ".work" / "init"
        if engine.is_main:
            build_tiny_encoder(init_dir, seed=s.seed, hidden=s.hidden, layers=s.layers, heads=s.heads,
                               tokenizer=tok_src, masked_lm=True)
        engine.wait()
        source = init_dir
    else:
        source = Path(s.init).expanduser()
        if not (source / "config.json").is_file():
            raise ModelNotFoundError(f"--init {source} is not a local model directory (no config.json); "
                                     "pass a ModernBERT checkpoint folder or 'tiny'")
        cfg = AutoConfig.from_pretrained(source, local_files_only=True)
        if cfg.model_type != "modernbert":
            raise ModelNotFoundError(f"--init {source} is a {cfg.model_type} model; pretrain-text continues "
                                     "ModernBERT checkpoints")
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    with _quiet_transformers():
        model = ModernBertForMaskedLM.from_pretrained(source, local_files_only=True, dtype=torch.float32,
                                                      attn_implementation="sdpa")
    if None in (tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        raise ModelNotFoundError(f"the tokenizer in {source} lacks a mask, cls, sep or pad token")
    model.config.sparse_prediction = True  # logits only at masked positions: the big CPU saving
    model.sparse_prediction = True
    return model, tokenizer, source


def masked_perplexity(model, tokenizer, blocks: list[list[int]], mlm_probability: float, seed: int,
                      device: torch.device, batch_size: int = 16) -> tuple[float, int]:
    """exp(mean cross-entropy over masked tokens), masks drawn from a fixed seed so the
    before and after figures score the very same positions. -> (perplexity, masked tokens)."""
    from transformers import DataCollatorForLanguageModeling

    if not blocks:
        raise CorpusError("the held-out split is empty; the corpus is too small for --holdout")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            batch = collator([{"input_ids": b} for b in blocks[i : i + batch_size]])
            n = int((batch["labels"] != -100).sum())
            if n == 0:
                continue
            out = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device))
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return math.exp(total / max(count, 1)), count


# --------------------------------------------------------------------------------------------
# the run


def pretrain_text(
    corpus: str,
    path: str | os.PathLike | None,
    init: str,
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    resume: bool = True,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    **options: Any,
) -> dict:
    """Masked-LM adaptation; writes a transformers checkpoint + metrics.json into `out_dir`.

    `options` are the fields of `PretrainSettings` (max_seq_len, mlm_probability, steps, epochs,
    batch_size, lr, warmup, schedule, seed, tokenizer, ...); `quick=True` applies a small CPU
    preset first (explicit options still win). Returns the metrics dict.

    A killed run resumes from ``<out_dir>.resume/`` when started again with the same settings (and the
    same ``init`` weights); a state of other settings, or an unreadable one, is discarded with a warning
    and the run starts over (`training.resume`); ``resume=False`` starts over without looking. A
    finished run with the same settings is returned as it is, not redone.
    """
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    preset = dict(QUICK) if quick else {}
    preset.update({k: v for k, v in options.items() if v is not None})
    if "categories" in preset:
        preset["categories"] = tuple(preset["categories"])
    s = PretrainSettings(corpus=corpus, path=str(path) if path else None, init=str(init), quick=quick, **preset)
    s.validate()
    out = Path(out_dir)
    engine = Engine(device)
    acc, device = engine.accelerator, engine.device
    started = time.perf_counter()
    torch.manual_seed(s.seed)
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
    engine.wait()

    init_dir = Path(s.init).expanduser()
    run = {"settings": _comparable(s),  # the corpus by name and path: a stream is not read twice to hash it
           "init": [sha256_file(f) for f in sorted(init_dir.glob("*.safetensors"))] if s.init != "tiny" else None}
    resume_state = ResumeState(engine, out, run, logger)
    done = out / METRICS_FILE
    if resume and done.is_file() and not resume_state.dir.exists():
        previous = json.loads(done.read_text())
        if _comparable_dict(previous.get("settings", {})) == _comparable(s):
            logger.info("%s already holds a finished run with these settings", out)
            return previous
    tensors, state = resume_state.load(resume) or ({}, {})

    model, tokenizer, source = _load_init_model(s, out, engine, lambda: _notes(s, heldout=False))
    if state:
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        except (RuntimeError, ValueError) as exc:
            raise resume_state.does_not_fit(exc) from exc
        model.tie_weights()
    model.to(device)

    eval_blocks = list(itertools.islice(pack_blocks(_notes(s, heldout=True), tokenizer, s.max_seq_len),
                                        s.max_eval_blocks))
    eval_seed = s.seed + 12345
    if state:
        ppl_before, eval_masked = state["perplexity_before"], state["eval_masked_tokens"]
    elif engine.is_main:
        ppl_before, eval_masked = masked_perplexity(model, tokenizer, eval_blocks, s.mlm_probability,
                                                    eval_seed, device)
        logger.info("held-out masked-token perplexity before: %.2f (%d masked tokens)", ppl_before, eval_masked)
    else:
        ppl_before, eval_masked = float("nan"), 0

    # Steps: given, or counted from one tokenizing pass over the training notes.
    world, rank = engine.num_processes, engine.process_index
    n_train_blocks = None
    if s.steps is None:
        n_train_blocks = state.get("train_blocks") or sum(
            1 for _ in pack_blocks(_notes(s, heldout=False), tokenizer, s.max_seq_len))
        if n_train_blocks == 0:
            raise CorpusError("the corpus yields no full training block; lower --max-seq-len")
        total_steps = max(1, math.ceil(n_train_blocks * s.epochs / (s.batch_size * world)))
    else:
        total_steps = s.steps
    warmup = int(s.warmup * total_steps) if s.warmup < 1 else int(s.warmup)
    lr = s.lr if s.lr is not None else (1e-3 if s.init == "tiny" else 5e-5)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = get_scheduler(s.schedule, opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    train_model, opt = acc.prepare(model, opt)
    step = int(state.get("step", 0))
    epoch = int(state.get("epoch", 0))
    consumed = int(state.get("blocks_consumed", 0))  # in the current epoch, across ranks
    tokens = int(state.get("tokens", 0))
    if state:
        try:
            load_optimizer_state(opt.optimizer, tensors, state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise resume_state.does_not_fit(exc) from exc
        resume_state.resumed(epoch + 1, step)
        with warnings.catch_warnings():  # fast-forwarding the schedule, no optimizer step is due
            warnings.simplefilter("ignore")
            for _ in range(step):
                sched.step()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=s.mlm_probability,
                                               seed=s.seed + 1000 * step + rank)
    if s.masking != "token":  # whole words or spans of words (held-out perplexity stays token-masked)
        collator = WordSpanCollator(tokenizer, s.mlm_probability, 3.0 if s.masking == "span" else 1.0,
                                    seed=s.seed + 1000 * step + rank)

    memory: dict[str, Any] = {"blocks": None, "too_big": False}

    def stream(ep: int) -> Iterator[list[int]]:
        return _shuffled(pack_blocks(_notes(s, heldout=False), tokenizer, s.max_seq_len),
                         s.shuffle_buffer, s.seed + ep)

    def ordered_blocks(ep: int) -> Iterator[list[int]]:
        """Epoch 0 streams and keeps the blocks when the corpus is small (under memory_tokens);
        later epochs reshuffle the kept blocks instead of re-reading and re-tokenizing."""
        if ep > 0 and memory["blocks"] is None and not memory["too_big"]:  # resumed past epoch 0
            for _ in collect(stream(0)):
                pass
        if ep > 0 and memory["blocks"] is not None:
            kept = list(memory["blocks"])
            random.Random(s.seed + ep).shuffle(kept)
            yield from kept
        else:
            yield from (collect(stream(ep)) if ep == 0 else stream(ep))

    def collect(blocks: Iterator[list[int]]) -> Iterator[list[int]]:
        kept: list[list[int]] | None = []
        total = 0
        for block in blocks:
            if kept is not None:
                kept.append(block)
                total += len(block)
                if total > s.memory_tokens:
                    kept = None
                    memory["too_big"] = True
            yield block
        memory["blocks"] = kept

    def epoch_blocks(ep: int, skip: int) -> Iterator[list[list[int]]]:
        """This process's batches: block i of the (seeded) stream goes to process i % world. A stream
        has no length, so accelerate's map-style loader sharding does not apply."""
        per_step = s.batch_size * world
        batch: list[list[int]] = []
        for i, block in enumerate(ordered_blocks(ep)):
            if i < skip:
                continue
            if i % world == rank:
                batch.append(block)
            if (i + 1 - skip) % per_step == 0:
                yield batch
                batch = []

    if s.steps is None:
        epochs_total: int | None = math.ceil(s.epochs)
    elif n_train_blocks is not None:
        epochs_total = math.ceil(total_steps * s.batch_size * world / n_train_blocks)
    else:
        epochs_total = None  # a step count on a stream never counted: the number of passes is not known
    bar = RunProgress(engine, desc="pretrain-text", enabled=progress, total_steps=total_steps, initial_step=step,
                      epochs_total=epochs_total, logger=logger)
    train_model.train()
    loss_ema = None
    while step < total_steps:
        got_any = False
        epoch_losses: list[float] = []
        for batch_blocks in epoch_blocks(epoch, consumed):
            got_any = True
            batch = collator([{"input_ids": b} for b in batch_blocks])
            with acc.accumulate(train_model):
                with acc.autocast():
                    outputs = train_model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device))
                acc.backward(outputs.loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            consumed += s.batch_size * world
            tokens += batch["input_ids"].numel() * world
            loss = engine.mean(outputs.loss)
            loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
            epoch_losses.append(loss)
            record = bar.record(epoch + 1, loss, sched.get_last_lr()[0], step=step, total_steps=total_steps)
            bar.step(dict(record, loss=loss_ema))  # the bar shows the smoothed loss
            if log and engine.is_main:
                log(record)
            if step % s.checkpoint_every == 0 and step < total_steps:
                opt_tensors, opt_meta = optimizer_state_tensors(opt.optimizer)
                weights = {f"model.{k}": v for k, v in model.state_dict().items()
                           if k != "decoder.weight"}  # tied to the token embeddings
                resume_state.save({**weights, **opt_tensors}, {
                    "step": step, "epoch": epoch, "blocks_consumed": consumed,
                    "tokens": tokens, "perplexity_before": ppl_before, "eval_masked_tokens": eval_masked,
                    "train_blocks": n_train_blocks, "seconds": time.perf_counter() - started, "optimizer": opt_meta})
            if step >= total_steps:
                break
        if not got_any and consumed == 0:
            raise CorpusError("the corpus yields no full training batch; lower --batch-size or --max-seq-len")
        if epoch_losses:
            bar.end_epoch(bar.record(epoch + 1, sum(epoch_losses) / len(epoch_losses), sched.get_last_lr()[0],
                                     step=step, total_steps=total_steps))
        if step < total_steps:
            epoch += 1
            consumed = 0
    bar.close()

    metrics: dict[str, Any] = {}
    if engine.is_main:
        ppl_after, _ = masked_perplexity(model, tokenizer, eval_blocks, s.mlm_probability, eval_seed, device)
        seconds = time.perf_counter() - started + float(state.get("seconds", 0.0))
        metrics = {
            "perplexity_before": ppl_before,
            "perplexity_after": ppl_after,
            "steps": step,
            "seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "eval_blocks": len(eval_blocks),
            "eval_masked_tokens": eval_masked,
            "epochs_started": epoch + 1,
            "world_size": world,
            "device": str(device),
            "init_source": str(source),
            "settings": asdict(s),
        }
        _save_final(out, model, tokenizer, metrics)
        logger.info("perplexity %.2f -> %.2f in %d steps", ppl_before, ppl_after, step)
    resume_state.finish()  # finished: the optimizer state is no longer needed
    return metrics


def _comparable(s: PretrainSettings) -> dict:
    return _comparable_dict(asdict(s))


def _comparable_dict(d: dict) -> dict:
    """Settings that change the result (not how often we checkpoint), JSON-normalised."""
    d = {k: v for k, v in d.items() if k != "checkpoint_every"}
    d["categories"] = list(d.get("categories") or [])
    return json.loads(json.dumps(d))


def _save_final(out: Path, model, tokenizer, metrics: dict) -> None:
    """The adapted model as a plain transformers folder; files moved in one by one, metrics last."""
    model.config.sparse_prediction = False  # normal fill-mask behaviour for users of the head
    staging = staging_dir(out / "final")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        atomic_write_json(out / METRICS_FILE, metrics)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / ".work", ignore_errors=True)


# --------------------------------------------------------------------------------------------
# command line


def add_pretrain_text_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `fasttextdiff pretrain-text` (also `python -m fasttextdiff.training.text_mlm`)."""
    parser.add_argument("--corpus", required=True, choices=CORPORA, help="which note collection to read")
    parser.add_argument("--path", default=None, help="corpus file or folder (optional for iu-xray: the "
                        "reports shipped in torchxrayvision are used)")
    parser.add_argument("--init", default="tiny", help="'tiny' (small ModernBERT from scratch) or a local "
                        "ModernBERT checkpoint directory to continue")
    parser.add_argument("--out", required=True, help="output directory (a loadable text encoder)")
    parser.add_argument("--quick", action="store_true", help="small CPU preset (a few minutes)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start over, discarding the state an interrupted run left beside --out (OUT.resume/)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="packed block length in tokens (default 512)")
    parser.add_argument("--mlm-probability", type=float, default=None,
                        help="share of tokens masked, 0.15-0.30 (default 0.30, ModernBERT's own)")
    parser.add_argument("--masking", choices=MASKINGS, default=None,
                        help="token (default), whole_word, or span (spans of whole words, mean 3)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    parser.add_argument("--epochs", type=float, default=None, help="passes over the training blocks (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per step and process (default 16)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default 1e-3 for a tiny model from scratch, 5e-5 to continue one)")
    parser.add_argument("--warmup", type=float, default=None, help="fraction (<1) or number of steps")
    parser.add_argument("--schedule", choices=("linear", "cosine"), default=None,
                        help="decay after warmup (default linear)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--tokenizer", choices=("bpe", "wordpiece", "minilm"), default=None,
                        help="with --init tiny: train a BPE/WordPiece tokenizer on the corpus, or use MiniLM's")
    parser.add_argument("--vocab-size", type=int, default=None, help="size of a trained tokenizer (default 8192)")
    parser.add_argument("--hidden", type=int, default=None, help="with --init tiny: hidden size (default 128)")
    parser.add_argument("--layers", type=int, default=None, help="with --init tiny: transformer layers (default 2)")
    parser.add_argument("--categories", nargs="+", default=None, help="MIMIC-III CATEGORY values to keep")
    parser.add_argument("--max-notes", type=int, default=None, help="read at most this many notes (a quick look)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


_OPTION_NAMES = ("max_seq_len", "mlm_probability", "masking", "steps", "epochs", "batch_size", "lr", "warmup",
                 "schedule", "seed", "tokenizer", "vocab_size", "hidden", "layers", "categories", "max_notes")


def run_pretrain_text(args: argparse.Namespace) -> int:
    """CLI entry: run, print the two perplexities, return 0."""
    options = {k: getattr(args, k, None) for k in _OPTION_NAMES}
    metrics = pretrain_text(args.corpus, args.path, args.init, args.out, quick=args.quick,
                            resume=args.resume, device=args.device, **options)
    if metrics:
        print(f"held-out masked-token perplexity: {metrics['perplexity_before']:.2f} -> "
              f"{metrics['perplexity_after']:.2f} ({metrics['steps']} steps, {metrics['seconds']:.0f} s); "
              f"encoder written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_pretrain_text_arguments(argparse.ArgumentParser(prog="fasttextdiff pretrain-text"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_pretrain_text(parser.parse_args(argv))


if __name__ == "__main__":
    from fasttextdiff.utils.environment import apply_process_defaults

    apply_process_defaults()
    raise SystemExit(main())
