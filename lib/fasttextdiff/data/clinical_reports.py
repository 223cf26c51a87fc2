"""Radiology-style reports for the synthetic look-alike lesions (the `clinical-reports` variant).

Why: the LViT-style sentence ("Unilateral pulmonary infection, one infected area, upper right lung.")
is one template with a handful of words, so any encoder that tells the words apart reads it
perfectly and a 10-token truncation loses little. Real reports are long, name places in many ways
and surround the one sentence that matters with findings about other things. This module writes
such reports for the labeled regions of a synthetic case:

- EXAMINATION / INDICATION / COMPARISON headers, then FINDINGS and IMPRESSION sections;
- places named by synonyms and abbreviations (right upper lobe / RUL / right upper zone / right
  apex ...), bilateral merges ("both lower lobes"), hedges ("possible", "probable") and negations
  for the side without labeled lesions ("No consolidation on the left.");
- distractor sentences about other findings (heart, mediastinum, pleura, bones, devices) taken
  from the real Indiana University chest X-ray reports (`corpora.iter_iu_xray`), filtered so that
  none names a side, a lung zone or an opacity (they never contradict the labels);
- 50-300 tokens, the lesion sentence placed anywhere in FINDINGS after the headers, so a
  10-token truncation never reaches it.

Held-out phrasing: every phrase bank has a `train` part (training and validation splits) and a
disjoint `heldout` part (test split): place phrases, finding nouns, hedges, sentence templates,
exam names, IU distractor sentences (split by a hash of the sentence), and the sentence order (in
`train` the lesion sentence precedes the bone findings, in `heldout` it follows them). A model is
therefore scored on wordings and orders it never saw in training.

Deterministic: the same regions and generator state give the same report; the IU corpus is read
once per process.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHRASINGS = ("train", "heldout")
TOKEN_RANGE = (50, 300)  # WordPiece tokens (MiniLM vocabulary) of every report, checked in the tests

# --- place phrases: region ("upper right" = patient's right upper third) -> phrases ---------------
# No phrase of one bank is a substring of a phrase of the other, so a held-out report never
# contains a training place phrase.
PLACES = {
    "train": {
        "upper right": ("right upper lobe", "RUL", "right upper zone", "right apex"),
        "middle right": ("right middle lobe", "RML", "right mid zone", "right midlung"),
        "lower right": ("right lower lobe", "RLL", "right lower zone", "right base"),
        "upper left": ("left upper lobe", "LUL", "left upper zone", "left apex"),
        "middle left": ("lingula", "left mid zone", "left midlung"),
        "lower left": ("left lower lobe", "LLL", "left lower zone", "left base"),
    },
    "heldout": {
        "upper right": ("right upper lung field", "apical right lung", "upper zone of the right lung"),
        "middle right": ("right mid lung field", "middle zone of the right lung", "right perihilar region"),
        "lower right": ("right lower lung field", "right basilar region", "base of the right lung"),
        "upper left": ("left upper lung field", "apical left lung", "upper zone of the left lung"),
        "middle left": ("left mid lung field", "middle zone of the left lung", "left perihilar region"),
        "lower left": ("left lower lung field", "left basilar region", "base of the left lung"),
    },
}
# Both sides of one level labeled: sometimes named together.
BILATERAL = {
    "train": {"upper": ("bilateral upper lobes", "both upper zones"),
              "middle": ("bilateral mid zones",),
              "lower": ("both lower lobes", "bilateral lower zones")},
    "heldout": {"upper": ("both apices", "bilateral upper lung fields"),
                "middle": ("both mid lung fields", "bilateral perihilar regions"),
                "lower": ("both bases", "bilateral basilar regions")},
}
NOUNS = {"train": ("airspace opacity", "consolidation", "patchy opacity", "focal airspace disease"),
         "heldout": ("infiltrate", "airspace consolidation", "hazy opacity", "ground-glass opacity")}
HEDGES = {"train": ("", "", "possible ", "probable ", "mild "),
          "heldout": ("", "", "questionable ", "suspected ", "subtle ")}
LESION_TEMPLATES = {
    "train": ("There is {hedge}{noun} in the {places}.",
              "{Hedge}{noun} is seen in the {places}.",
              "{Places} {hedge}{noun}.",
              "Interval development of {hedge}{noun} in the {places}."),
    "heldout": ("{Hedge}{noun} projects over the {places}.",
                "The {places} {demonstrate} {hedge}{noun}.",
                "Note is made of {hedge}{noun} within the {places}."),
}
IMPRESSION_TEMPLATES = {
    "train": ("{Places} {noun}, {tail}.", "{Noun} in the {places}, {tail}."),
    "heldout": ("Findings in the {places} {tail}.", "{Noun} of the {places}, {tail}."),
}
TAILS = {"train": ("likely pneumonia", "concerning for infection", "possibly pneumonia"),
         "heldout": ("may represent pneumonia", "compatible with infection")}
NEGATIONS = {
    "train": ("No consolidation on the {side}.", "The {side} lung is clear.", "No focal opacity in the {side} lung."),
    "heldout": ("{Side} hemithorax is without focal airspace disease.", "No infiltrate is seen on the {side}."),
}
EXAMS = {"train": ("Chest PA and lateral", "Chest, 2 views, frontal and lateral", "PA and lateral views of the chest"),
         "heldout": ("Chest radiograph, frontal and lateral projections", "CHEST 2V FRONTAL/LATERAL",
                     "Two views of the chest")}
FALLBACK_INDICATIONS = ("XXXX-year-old with cough.", "Shortness of breath.", "Fever and cough.")

# A distractor must not name a side, a lung zone, an opacity or a verdict on the lungs: it may
# never contradict which lesions are labeled.
_EXCLUDE = re.compile(
    r"\b(right|left|upper|lower|middle|mid|midlung|lobes?|lobar|bases?|basilar|basal|bibasilar|apex|apices|"
    r"apical|biapical|lingula|lingular|zones?|hilar|perihilar|hila|hilum|bilateral|bilaterally|both|"
    r"lungs?|pulmonary|opacit\w*|consolidat\w*|airspace|air|infiltrat\w*|pneumonia|infect\w*|atelecta\w*|"
    r"granulom\w*|nodul\w*|mass|masses|scar\w*|densit\w*|clear|acute|abnormal\w*|normal chest|lesions?|"
    r"disease|process|findings?|r|l|rul|rml|rll|lul|lll)\b",
    re.IGNORECASE,
)
_CATEGORIES = (
    ("bones", re.compile(r"osseous|bone|bony|spine|spinal|spondyl|degenerative|\bribs?\b|fracture|vertebra|"
                         r"skeletal|thoracic|sternotomy|clavicle|shoulder|scoliosis|kyphosis|osteophyte|"
                         r"humer|arthrit|osteopen", re.IGNORECASE)),
    ("pleura", re.compile(r"pleura|pneumothora|effusion|costophrenic", re.IGNORECASE)),
    ("cardio", re.compile(r"heart|cardi|mediastin|aort|vascul|silhouette", re.IGNORECASE)),
)
MAX_APPROX_TOKENS = 185
KINDS = ("cardio", "lesion", "negation", "pleura", "bones", "other")
_APPROX_TOKEN = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


@dataclass(frozen=True)
class ClinicalReport:
    """A report and what it was built from (the tests check the held-out property on these)."""

    text: str
    phrasing: str
    regions: tuple[str, ...]  # the labeled regions the report names
    places: tuple[str, ...]  # place phrases used, in the FINDINGS sentence
    templates: tuple[str, ...]  # sentence templates used
    words: tuple[str, ...]  # nouns, hedges, tails, exam name
    distractors: tuple[str, ...]  # IU sentences used
    order: tuple[str, ...]  # kinds of the FINDINGS sentences, in order
    lesion_sentence: str


def approx_tokens(text: str) -> int:
    """Words, numbers and punctuation marks: a lower bound of a WordPiece count, without a tokenizer."""
    return len(_APPROX_TOKEN.findall(text))


def _heldout(sentence: str) -> bool:
    return int(hashlib.sha256(sentence.lower().encode("utf-8")).hexdigest()[:8], 16) % 5 == 0


def _sentences(text: str) -> list[str]:
    out = []
    for raw in re.split(r"(?<=\.)\s+", text):
        s = re.sub(r"\.{2,}", ".", raw.strip())
        if not s or not s[0].isupper():
            continue
        if not s.endswith("."):
            s += "."
        words = s.split()
        if not 3 <= len(words) <= 30 or s.count("XXXX") > 1 or "<" in s or _EXCLUDE.search(s):
            continue
        out.append(s)
    return out


def _category(sentence: str) -> str:
    for name, pattern in _CATEGORIES:
        if pattern.search(sentence):
            return name
    return "other"


@dataclass(frozen=True)
class SentencePool:
    """Filtered IU report sentences by section, category and phrasing bank (with their frequencies)."""

    findings: dict  # (phrasing, category) -> tuple of sentences, repeated as often as they occur
    impression: dict  # phrasing -> tuple
    indication: dict  # phrasing -> tuple


@functools.lru_cache(maxsize=4)
def iu_sentence_pool(path: str | None = None) -> SentencePool:
    """Read the IU X-ray reports once (torchxrayvision's NLMCXR_reports.tgz unless `path` is given)."""
    from fasttextdiff.data.corpora import iter_iu_xray_sections

    findings: dict = {(p, k): [] for p in PHRASINGS for k in ("cardio", "pleura", "bones", "other")}
    impression: dict = {p: [] for p in PHRASINGS}
    indication: dict = {p: [] for p in PHRASINGS}
    for parts in iter_iu_xray_sections(Path(path) if path else None):
        for s in _sentences(parts.get("FINDINGS", "")):
            findings[("heldout" if _heldout(s) else "train", _category(s))].append(s)
        for s in _sentences(parts.get("IMPRESSION", "")):
            impression["heldout" if _heldout(s) else "train"].append(s)
        s = re.sub(r"\s+", " ", parts.get("INDICATION", "").strip())
        if 2 <= len(s.split()) <= 16 and s.count("XXXX") <= 2 and not _EXCLUDE.search(s) and "<" not in s:
            indication["heldout" if _heldout(s) else "train"].append(s if s.endswith(".") else s + ".")
    for key, items in findings.items():
        if not items:
            raise ValueError(f"the IU corpus gave no {key[1]} sentences for the {key[0]} bank; is it complete?")
    return SentencePool({k: tuple(v) for k, v in findings.items()}, {k: tuple(v) for k, v in impression.items()},
                        {k: tuple(v) for k, v in indication.items()})


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def place_phrases(regions: list[str], rng: np.random.Generator, phrasing: str) -> list[str]:
    """One phrase per labeled region; both sides of a level are sometimes merged ("both lower lobes")."""
    regions = list(regions)
    phrases = []
    for level in ("upper", "middle", "lower"):
        pair = [f"{level} right", f"{level} left"]
        if all(r in regions for r in pair) and rng.random() < 0.5:
            phrases.append(_pick(rng, BILATERAL[phrasing][level]))
            regions = [r for r in regions if r not in pair]
    phrases += [_pick(rng, PLACES[phrasing][r]) for r in regions]
    order = rng.permutation(len(phrases))
    return [phrases[i] for i in order]


def mentions(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words, any case ("RUL" is not found inside "RULE")."""
    return re.search(rf"(?<![\w-]){re.escape(phrase.lower())}(?![\w-])", text.lower()) is not None


def regions_named(text: str) -> set[str]:
    """Every region whose place phrase (either bank, bilateral merges included) occurs in `text`."""
    found = set()
    for bank in PHRASINGS:
        for region, phrases in PLACES[bank].items():
            if any(mentions(text, p) for p in phrases):
                found.add(region)
        for level, phrases in BILATERAL[bank].items():
            if any(mentions(text, p) for p in phrases):
                found |= {f"{level} right", f"{level} left"}
    return found


def _fill(template: str, **words: str) -> str:
    values = dict(words)
    values.update({k[:1].upper() + k[1:]: _cap(v) for k, v in words.items()})
    text = template.format(**values)
    return _cap(re.sub(r"\s+", " ", text).strip())


def clinical_report(regions: list[str] | tuple[str, ...], rng: np.random.Generator, phrasing: str = "train",
                    pool: SentencePool | None = None) -> ClinicalReport:
    """A FINDINGS/IMPRESSION report naming exactly `regions` (see the module doc)."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    if not regions:
        raise ValueError("a clinical report needs at least one labeled region")
    pool = pool or iu_sentence_pool()
    bank = phrasing
    used_templates, used_words, distractors = [], [], []

    places = place_phrases(list(regions), rng, bank)
    noun, hedge = _pick(rng, NOUNS[bank]), _pick(rng, HEDGES[bank])
    template = _pick(rng, LESION_TEMPLATES[bank])
    lesion = _fill(template, hedge=hedge, noun=noun, places=_join(places),
                   demonstrate="demonstrates" if len(places) == 1 and not places[0].startswith(("both", "bilateral"))
                   else "demonstrate")
    used_templates.append(template)
    used_words += [noun, hedge.strip()]

    slots: dict[str, list[str]] = {k: [] for k in KINDS}
    slots["lesion"].append(lesion)
    sides = {r.split()[1] for r in regions}
    free_sides = [s for s in ("right", "left") if s not in sides]
    if free_sides and rng.random() < 0.7:
        neg = _pick(rng, NEGATIONS[bank])
        slots["negation"].append(_fill(neg, side=free_sides[0]))
        used_templates.append(neg)

    # headers
    exam = _pick(rng, EXAMS[bank])
    used_words.append(exam)
    indication = _pick(rng, pool.indication[bank] or FALLBACK_INDICATIONS)
    comparison = _pick(rng, ("None.", "None available.", "XXXX.") if bank == "train"
                       else ("No prior studies.", "Prior chest radiograph XXXX."))
    header = [f"EXAMINATION: {exam}.", f"INDICATION: {indication}", f"COMPARISON: {comparison}"]

    # impression: the lesion restated (other words) or not, plus IU impression sentences
    impression: list[str] = []
    if rng.random() < 0.6:
        imp_t = _pick(rng, IMPRESSION_TEMPLATES[bank])
        tail = _pick(rng, TAILS[bank])
        imp_places = place_phrases(list(regions), rng, bank)
        impression.append(_fill(imp_t, places=_join(imp_places), noun=_pick(rng, NOUNS[bank]), tail=tail))
        used_templates.append(imp_t)
        used_words.append(tail)
        places += imp_places
    for _ in range(int(rng.integers(0, 2)) if impression else 1):
        s = _pick(rng, pool.impression[bank])
        impression.append(s)
        distractors.append(s)
    imp_order = rng.permutation(len(impression))
    impression = [impression[i] for i in imp_order]
    if len(impression) > 1 and rng.random() < 0.5:
        impression = [f"{i + 1}. {s}" for i, s in enumerate(impression)]

    # findings distractors: one of each of cardio/pleura/bones, then more until the target length
    for kind in ("cardio", "pleura", "bones"):
        s = _pick(rng, pool.findings[(bank, kind)])
        slots[kind].append(s)
        distractors.append(s)

    def render() -> str:
        return "\n".join(header + ["FINDINGS: " + " ".join(s for k in order for s in slots[k]),
                                   "IMPRESSION: " + " ".join(impression)])

    order = list(KINDS)
    target = int(rng.integers(45, 181))  # approximate tokens; the WordPiece count stays within TOKEN_RANGE
    while approx_tokens(render()) < target:
        kind = _pick(rng, ("cardio", "pleura", "bones", "other", "other"))
        s = _pick(rng, pool.findings[(bank, kind)])
        slots[kind].append(s)
        if approx_tokens(render()) > MAX_APPROX_TOKENS:  # WordPiece runs up to 1.6x the approximate count
            slots[kind].pop()
            break
        distractors.append(s)
    for kind in ("cardio", "pleura", "bones", "other"):
        perm = rng.permutation(len(slots[kind]))
        slots[kind] = [slots[kind][i] for i in perm]
    # sentence order: in `train` the lesion precedes the bone findings, in `heldout` it follows them
    while True:
        order = [KINDS[i] for i in rng.permutation(len(KINDS))]
        lesion_first = order.index("lesion") < order.index("bones")
        if lesion_first == (bank == "train"):
            break
    text = render()
    return ClinicalReport(text=text, phrasing=phrasing, regions=tuple(sorted(regions)), places=tuple(places),
                          templates=tuple(used_templates), words=tuple(w for w in used_words if w),
                          distractors=tuple(distractors), order=tuple(k for k in order if slots[k]),
                          lesion_sentence=lesion)
