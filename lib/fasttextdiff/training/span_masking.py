"""Masking whole words and spans of words for masked-language-model adaptation.

Why our own: transformers' whole-word masking needs the tokenizer's offset mapping, which packed
pretraining blocks (token ids of many notes concatenated) no longer have. Clinical phrases
("right upper lobe", "costophrenic angle") are split into several sub-word tokens; masking one
piece of a word lets the model fill it from the other pieces, while masking the whole word, or a
span of words (SpanBERT: span lengths drawn from a geometric distribution), makes it predict
the phrase from its context, which is what a report encoder must understand.
"""

from __future__ import annotations

import numpy as np
import torch

MASKINGS = ("token", "whole_word", "span")


def word_start_flags(tokenizer) -> np.ndarray:
    """For every vocabulary id: True where the token begins a word. WordPiece continues words with
    '##'; byte-level BPE (ModernBERT's kind) begins them with 'Ġ' (a space)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    wordpiece = any(t.startswith("##") for t in vocab if t)
    flags = np.ones(len(vocab), dtype=bool)
    for i, token in enumerate(vocab):
        if not token:
            continue
        if wordpiece:
            flags[i] = not token.startswith("##")
        else:
            flags[i] = token.startswith("Ġ") or not token[0].isalnum()
    return flags


class WordSpanCollator:
    """`collator([{"input_ids": [...]}, ...]) -> {"input_ids", "labels"}` with whole words masked.

    About `mlm_probability` of the non-special tokens are selected, a whole word at a time
    (`mean_span_words=1`) or in spans of words whose length is geometric with that mean, capped at
    `max_span_words`; selected tokens become [MASK] 80 %, a random token 10 %, unchanged 10 %.
    """

    def __init__(self, tokenizer, mlm_probability: float = 0.3, mean_span_words: float = 1.0,
                 max_span_words: int = 10, seed: int = 0):
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mean_span_words < 1:
            raise ValueError(f"mean_span_words must be >= 1, got {mean_span_words}")
        self.tokenizer = tokenizer
        self.mlm_probability = mlm_probability
        self.mean_span_words = mean_span_words
        self.max_span_words = max_span_words
        self.starts = word_start_flags(tokenizer)
        self.special = np.zeros(len(tokenizer), dtype=bool)
        self.special[[i for i in tokenizer.all_special_ids if i is not None and i < len(tokenizer)]] = True
        self.rng = np.random.default_rng(seed)

    def _words(self, ids: np.ndarray) -> list[tuple[int, int]]:
        """(start, end) token ranges of the words in one block; special tokens belong to none."""
        words: list[tuple[int, int]] = []
        for pos, tok in enumerate(ids):
            if self.special[tok]:
                continue
            if self.starts[tok] or not words or words[-1][1] != pos:
                words.append((pos, pos + 1))
            else:
                words[-1] = (words[-1][0], pos + 1)
        return words

    def _select(self, ids: np.ndarray) -> np.ndarray:
        words = self._words(ids)
        selected = np.zeros(len(ids), dtype=bool)
        if not words:
            return selected
        budget = max(1, round(self.mlm_probability * sum(e - s for s, e in words)))
        order = self.rng.permutation(len(words))
        for first in order:
            if selected.sum() >= budget:
                break
            if self.mean_span_words > 1:
                span = min(int(self.rng.geometric(1.0 / self.mean_span_words)), self.max_span_words)
            else:
                span = 1
            for start, end in words[first:first + span]:
                if selected.sum() >= budget:
                    break
                selected[start:end] = True
        return selected

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = np.array([e["input_ids"] for e in examples], dtype=np.int64)
        labels = np.full_like(ids, -100)
        inputs = ids.copy()
        for row in range(ids.shape[0]):
            selected = self._select(ids[row])
            labels[row, selected] = ids[row, selected]
            draw = self.rng.random(ids.shape[1])
            inputs[row, selected & (draw < 0.8)] = self.tokenizer.mask_token_id
            randomised = selected & (draw >= 0.8) & (draw < 0.9)
            inputs[row, randomised] = self.rng.integers(0, len(self.tokenizer), int(randomised.sum()))
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}
