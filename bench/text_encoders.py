"""Which text encoder reads radiology reports best? - the encoder comparison on the
clinical-reports set.

Same data, backbone, labeled subsets, schedule and fusion for every encoder; only the text changes.
Run by default (--quick):
  no_text             the network without its text branch
  minilm_trunc10      the real pretrained all-MiniLM-L6-v2 BERT, reports cut to 10 tokens as the reference does
  minilm_focus        the same BERT reading the whole report, attending to the 3 sentences nearest FOCUS
  tiny_random_focus   the "tiny" ModernBERT (hidden 64, 2 layers, MiniLM WordPiece vocabulary), random weights
                      (what `fasttextdiff` uses by default: no ModernBERT weights can be had offline), same focus
  tiny_adapted_focus  the same weights after `pretrain-text` on the IU X-ray reports (masked-LM, --quick)
On request: the same three attending to every token of the report (tiny_random, tiny_adapted, minilm:
measured at most +0.03 over minilm_trunc10, see bench/results/text_encoders_partial.md), and for point 4
(adaptation that could make the clinical encoder win):
  tiny_adapted_long  the tiny weights after a 4x longer MLM run (--adapt-steps-long)
  tiny_adapted_span  the tiny weights after MLM with span masking (spans of whole words, mean 3: clinical
                     phrases such as "right upper lobe" are masked whole)
  bpe_random / bpe_adapted  a tiny ModernBERT with a BPE vocabulary trained on the IU corpus (`tokenizers`),
                     before and after MLM

The set (`demo-data --variant clinical-reports`): the text-necessary cases with reports written as
radiology reports (50-300 tokens, the lesion sentence never in the first 10 tokens; the test split
uses phrasings and sentence orders never seen in training). Model choice on the validation split
(training phrasings), test split scored once.

    python bench/text_encoders.py --quick           # 10/25/50 %, seeds 0 1 2, the five default encoders
    python bench/text_encoders.py --quick --name text_encoders_adaptation \
        --encoders tiny_random tiny_adapted_long tiny_adapted_span bpe_random bpe_adapted
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import common
from common import mean_std

import accuracy

ENCODERS = ("no_text", "minilm_trunc10", "minilm_focus", "tiny_random_focus", "tiny_adapted_focus")
# The same encoders reading only the report's sentences nearest a description of the finding
# (TextConfig.focus). FOCUS was chosen on the validation split (training phrasings): with MiniLM its top 3
# sentences held the lesion sentence in 32 of 32 validation reports.
FOCUS = "Airspace opacity or consolidation in the right or left lung."
FOCUS_ENCODERS = ("minilm_focus", "tiny_random_focus", "tiny_adapted_focus")
EXTRA_ENCODERS = ("tiny_random", "tiny_adapted", "minilm", "tiny_adapted_long", "tiny_adapted_span", "bpe_random",
                  "bpe_adapted")
# fusion width 64, the library default (FusionConfig.dim), not the accuracy bench's 32: on the validation
# split at 25 % labels (seed 0, minilm_focus) 32 gave Dice 0.633, 64 gave 0.693 (128: 0.707, but 0.323 on the
# held-out test phrasings, and twice the time)
QUICK = replace(accuracy.QUICK, seeds=(0, 1, 2), budgets=(0.1, 0.25, 0.5), methods=(), fusion_dim=64)
FULL = replace(accuracy.FULL, seeds=(0, 1, 2), methods=(), fusion_dim=64)
ADAPT_STEPS = 240  # the pretrain-text --quick preset
ADAPT_STEPS_LONG = 960


def adapt(init: str, out: Path, steps: int, **options) -> dict:
    """`fasttextdiff pretrain-text --corpus iu-xray --quick --init INIT` with the given overrides."""
    from fasttextdiff.training.text_mlm import pretrain_text

    metrics = pretrain_text("iu-xray", None, init, out, quick=True, resume=False, progress=False, steps=steps,
                            lr=2e-3, **options)
    return {k: metrics.get(k) for k in ("perplexity_before", "perplexity_after", "steps", "seconds", "tokens")}


def prepare_encoders(names: list[str], work: Path, adapt_steps: int, adapt_steps_long: int,
                     local: dict | None = None) -> tuple[dict, dict]:
    """-> ({name: TextConfig or None}, {name: how it was made + MLM metrics}). Adapted encoders already in
    `work`/encoders (an earlier run's, or --encoder-dir) are reused: runs split over processes share them.
    `local`: {label: model folder} given as LABEL=DIR on the command line."""
    from fasttextdiff.config import TextConfig
    from fasttextdiff.text.encoder import build_tiny_encoder, default_tiny_dir, minilm_dir

    configs, info = {}, {}
    tiny = str(default_tiny_dir())
    for name in names:
        t0 = time.perf_counter()
        if name in FOCUS_ENCODERS:
            base = name.removesuffix("_focus")
            sub_configs, sub_info = prepare_encoders([base], work, adapt_steps, adapt_steps_long)
            configs[name] = replace(sub_configs[base], focus=FOCUS)
            info[name] = {**sub_info[base], "encoder": f"{sub_info[base]['encoder']}, only the 3 sentences nearest "
                                                       f"{FOCUS!r}"}
        elif name == "no_text":
            configs[name], info[name] = None, {"encoder": "none"}
        elif name in (local or {}):  # a local encoder folder (e.g. a clinical ModernBERT), with the focus
            folder = local[name]
            configs[name] = TextConfig(encoder=str(folder), focus=FOCUS)
            info[name] = {"encoder": f"the local encoder in {folder}, only the 3 sentences nearest {FOCUS!r}"}
        elif name == "tiny_random":
            configs[name], info[name] = TextConfig(encoder="tiny"), {"encoder": "tiny (random init)"}
        elif name in ("tiny_adapted", "tiny_adapted_long", "tiny_adapted_span"):
            steps = adapt_steps_long if name == "tiny_adapted_long" else adapt_steps
            options = {"masking": "span"} if name == "tiny_adapted_span" else {}
            out = work / "encoders" / name
            done = work / "encoders" / f"{name}_mlm.json"
            if not ((out / "config.json").is_file() and done.is_file()):
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(adapt(tiny, out, steps, **options)))
            mlm = json.loads(done.read_text())
            configs[name] = TextConfig(encoder=str(out))
            info[name] = {"encoder": f"tiny after pretrain-text --corpus iu-xray --quick --init <tiny> --steps {steps}"
                                     + (" --masking span" if options else ""), "mlm": mlm}
        elif name in ("bpe_random", "bpe_adapted"):
            adapted = work / "encoders" / "bpe_adapted"
            if not (adapted / "config.json").is_file():
                mlm = adapt("tiny", adapted, adapt_steps, tokenizer="bpe", hidden=64, layers=2)
                (work / "encoders" / "bpe_mlm.json").write_text(json.dumps(mlm))
            mlm = json.loads((work / "encoders" / "bpe_mlm.json").read_text())
            if name == "bpe_adapted":
                configs[name] = TextConfig(encoder=str(adapted))
                info[name] = {"encoder": "pretrain-text --init tiny --tokenizer bpe --hidden 64 --layers 2 --quick",
                              "mlm": mlm}
            else:  # the very weights that run started from: build_tiny_encoder with the same seed and tokenizer
                before = work / "encoders" / "bpe_random"
                build_tiny_encoder(before, seed=0, hidden=64, layers=2, heads=4, tokenizer=str(adapted),
                                   masked_lm=True)
                configs[name] = TextConfig(encoder=str(before))
                info[name] = {"encoder": "bpe_adapted's architecture, tokenizer and initial weights, no MLM steps"}
        elif name == "minilm":
            configs[name], info[name] = TextConfig(encoder=str(minilm_dir())), {"encoder": "all-MiniLM-L6-v2, whole "
                                                                                           "report"}
        elif name == "minilm_trunc10":
            configs[name] = TextConfig(encoder=str(minilm_dir()), max_length=10, truncate=True)
            info[name] = {"encoder": "all-MiniLM-L6-v2, [CLS] + 8 tokens + [SEP] (the reference's max_length=10)"}
        else:
            raise SystemExit(f"unknown encoder {name!r}; choose from {list(ENCODERS + EXTRA_ENCODERS)}")
        info[name]["prepare_seconds"] = round(time.perf_counter() - t0, 1)
    return configs, info


def focus_recall(configs: dict, splits: dict) -> dict:
    """Per focus encoder and split: the share of reports whose kept sentences still name a labeled region
    (the findings sentence or the impression's restatement; negations name a side only, never a region)."""
    from fasttextdiff.data.clinical_reports import regions_named
    from fasttextdiff.text.encoder import TextEncoder

    out = {}
    for name, config in configs.items():
        if config is None or config.focus is None:
            continue
        encoder = TextEncoder(config)
        out[name] = {split: sum(bool(regions_named(encoder.focused(s.text))) for s in splits[split])
                     / len(splits[split])
                     for split in ("val", "test") if splits.get(split)}
        print(f"[text_encoders] {name}: lesion kept in {out[name]}", flush=True)
    return out


def region_probe(splits: dict, train_sizes=(32, 128)) -> dict:
    """Can the named regions be read from frozen MiniLM states by a linear model trained on a few reports?

    Per lung region, a logistic regression (scikit-learn) on one vector per report: the mean or the max of
    its token states, or the mean state of the sentence that names the lesions alone (an oracle choice of
    sentence). Scored on the validation (training phrasings) and test (held-out phrasings) reports against
    the majority-class rate.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from fasttextdiff.config import TextConfig
    from fasttextdiff.data.clinical_reports import PLACES, regions_named
    from fasttextdiff.text.encoder import TextEncoder, minilm_dir, split_sentences

    regions = list(PLACES["train"])
    encoder = TextEncoder(TextConfig(encoder=str(minilm_dir())))

    def vector(text: str, reading: str) -> np.ndarray:
        if reading == "lesion_sentence":
            text = next((x for x in split_sentences(text) if regions_named(x)), "")
        states = encoder.encode([text]).states[0]
        return (states.max(0).values if reading == "token_max" else states.mean(0)).numpy()

    def targets(samples) -> np.ndarray:
        return np.array([[r in regions_named(s.text) for r in regions] for s in samples])

    out = {"regions": regions, "encoder": "all-MiniLM-L6-v2 (frozen)", "readings": {}}
    for reading in ("token_mean", "token_max", "lesion_sentence"):
        rows = {}
        for n in train_sizes:
            train = splits["train"][:n]
            x_train, y_train = np.stack([vector(s.text, reading) for s in train]), targets(train)
            for split in ("val", "test"):
                x, y = np.stack([vector(s.text, reading) for s in splits[split]]), targets(splits[split])
                acc = [float((LogisticRegression(max_iter=3000).fit(x_train, y_train[:, k]).predict(x) == y[:,
                                                                                                            k]).mean())
                       for k in range(len(regions)) if len(set(y_train[:, k])) > 1]
                rows[f"{split}_{n}_reports"] = {"accuracy": float(np.mean(acc)) if acc else None,
                                                "majority": float(np.maximum(y.mean(0), 1 - y.mean(0)).mean())}
        out["readings"][reading] = rows
        print(f"[text_encoders] probe {reading}: {rows}", flush=True)
    return out


def place_phrases(configs: dict, splits: dict) -> dict:
    """Does an encoder know that a held-out place phrase ("right basilar region") names the same place as a
    training one ("right lower lobe")? Each held-out phrase (bilateral merges included) is given the regions
    of its nearest training phrase: by cosine of the phrases' mean-pooled states per encoder, and by shared
    words (Jaccard; ties split evenly) as a reader that knows no synonyms. Scored per phrase, and per test
    report: the share of reports whose every held-out place phrase is read right. That share bounds how
    much of the report's information any reader built on those states can use on the test split."""
    import re

    import numpy as np

    from fasttextdiff.data.clinical_reports import BILATERAL, PLACES, mentions
    from fasttextdiff.text.encoder import TextEncoder

    def bank(name: str) -> list[tuple[str, frozenset]]:
        rows = [(p, frozenset({r})) for r, phrases in PLACES[name].items() for p in phrases]
        return rows + [(p, frozenset({f"{lvl} right", f"{lvl} left"})) for lvl, phrases in BILATERAL[name].items()
                       for p in phrases]

    train, heldout = bank("train"), bank("heldout")
    words = lambda t: set(re.findall(r"[a-z]+", t.lower()))  # noqa: E731

    def lexical(phrase: str) -> dict:  # region set -> share of the vote
        scores = [len(words(phrase) & words(p)) / len(words(phrase) | words(p)) for p, _ in train]
        best = [train[i][1] for i, sc in enumerate(scores) if sc == max(scores) and sc > 0]
        return {r: best.count(r) / len(best) for r in set(best)}

    readers = {"shared words (no synonyms known)": lexical}
    whole_phrase = {name.removesuffix("_focus"): replace(config, focus=None) for name, config in configs.items()
                    if config is not None and not name.endswith("trunc10")}  # a phrase is read whole, no focus
    for name, config in whole_phrase.items():
        encoder = TextEncoder(config)

        def pooled(texts: list[str], encoder=encoder) -> np.ndarray:
            batch = encoder.encode(texts)
            m = batch.mask.float().unsqueeze(-1)
            v = ((batch.states * m).sum(1) / m.sum(1)).numpy()
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        reference = pooled([p for p, _ in train])

        def nearest(phrase: str, reference=reference, pooled=pooled) -> dict:
            return {train[int(np.argmax(reference @ pooled([phrase])[0]))][1]: 1.0}

        readers[name] = nearest
    out = {"train_phrases": len(train), "heldout_phrases": len(heldout), "readers": {}}
    tests = [s.text for s in splits.get("test", [])]
    for reader_name, read in readers.items():
        credit = {p: read(p).get(regions, 0.0) for p, regions in heldout}
        per_report = []
        for text in tests:
            used = [p for p, _ in heldout if mentions(text, p)]
            if used:
                per_report.append(float(np.prod([credit[p] for p in used])))
        out["readers"][reader_name] = {
            "phrases_read_right": round(sum(credit.values()), 2),
            "phrase_accuracy": sum(credit.values()) / len(heldout),
            "test_reports_read_right": float(np.mean(per_report)) if per_report else None,
            "test_reports_with_a_place": len(per_report),
            "wrong": sorted(p for p, c in credit.items() if c < 1)}
        print(f"[text_encoders] place phrases, {reader_name}: {sum(credit.values()):.1f}/{len(heldout)} phrases, "
              f"{out['readers'][reader_name]['test_reports_read_right']} of test reports", flush=True)
    return out


def aggregate(runs: list[dict], order: list[str]) -> list[dict]:
    out = []
    for name in order:
        for fraction in sorted({r["labeled_fraction"] for r in runs}):
            group = [r for r in runs if r["method"] == name and r["labeled_fraction"] == fraction]
            if not group:
                continue
            dm, ds = mean_std([r["dice"] for r in group])
            im, is_ = mean_std([r["iou"] for r in group])
            out.append({"method": name, "labeled_fraction": fraction, "labeled_images": group[0]["labeled_images"],
                        "dice_mean": dm, "dice_std": ds, "iou_mean": im, "iou_std": is_,
                        "val_dice_mean": mean_std([r["val_dice"] for r in group])[0],
                        "seeds": [r["seed"] for r in group]})
    return out


def acceptance(results: list[dict]) -> dict:
    """Whole-report encoders vs the 10-token truncation at 25 % labels (goal: >= 0.15 Dice)."""
    table = {(r["method"], r["labeled_fraction"]): r for r in results}
    checks = []
    if ("minilm_trunc10", 0.25) in table:
        base = table[("minilm_trunc10", 0.25)]["dice_mean"]
        for name in dict.fromkeys(m for m, _ in table):
            if (name, 0.25) in table and name not in ("no_text", "minilm_trunc10"):
                gap = table[(name, 0.25)]["dice_mean"] - base
                checks.append({"encoder": name, "claim": f"{name} - minilm_trunc10 >= 0.15 Dice at 25 %",
                               "dice_gap": gap, "holds": gap >= 0.15})
    for adapted, plain in (("tiny_adapted", "tiny_random"), ("tiny_adapted_focus", "tiny_random_focus")):
        gaps = {f: table[(adapted, f)]["dice_mean"] - table[(plain, f)]["dice_mean"]
                for (m, f) in table if m == adapted and (plain, f) in table}
        if gaps:
            checks.append({"encoder": adapted, "claim": f"clinical adaptation: {adapted} - {plain}",
                           "dice_gap_by_budget": gaps, "holds": None})
    return {"checks": checks,
            "all_hold": all(c["holds"] for c in checks if c["holds"] is not None) if checks else None}


def pivot(result: dict, metric: str = "dice") -> str:
    table = {(r["method"], r["labeled_fraction"]): r for r in result["results"]}
    names = list(dict.fromkeys(r["method"] for r in result["results"]))
    rows = []
    for f in sorted({k[1] for k in table}):
        images = next(table[(n, f)]["labeled_images"] for n in names if (n, f) in table)
        rows.append([f"{100 * f:g} % ({images})"] + [
            f"{table[(n, f)][metric + '_mean']:.3f} ± {table[(n, f)][metric + '_std']:.3f}" if (n, f) in table else ""
            for n in names])
    return common.markdown_table(["labeled (images)"] + names, rows, ["---"] + ["---:"] * len(names))


def markdown(result: dict) -> str:
    lines = ["# Text encoders on radiology-style reports (clinical-reports set)", "",
             f"Command: `{result['command']}`  ",
             f"Data: {result['description']}; splits train/val/test = {result['split_sizes']}.  ",
             f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} torch thread(s), load "
             "average "
             f"{result['machine']['loadavg_start']} at start, {result['loadavg_end']} at end.  ",
             f"Seeds {list(result['plan']['seeds'])}; text path: text_residual={result['fusion']['text_residual']}, "
             f"text_dropout={result['fusion']['text_dropout']}, "
             f"text_fallback={result['fusion'].get('text_fallback')}; "
             f"wall time {result['seconds'] / 60:.1f} min"
             + (f" (merged from {len(result['merged_from'])} result files run side by side; the longest)."
                if result.get("merged_from") else "."), "",
             "Test Dice (held-out phrasings), mean ± std over seeds:", "", pivot(result), "",
             "Validation Dice (training phrasings), mean over seeds:", ""]
    table = {(r["method"], r["labeled_fraction"]): r for r in result["results"]}
    names = list(dict.fromkeys(r["method"] for r in result["results"]))
    rows = [[f"{100 * f:g} %"] + [f"{table[(n, f)]['val_dice_mean']:.3f}" if (n, f) in table else "" for n in names]
            for f in sorted({k[1] for k in table})]
    lines += [common.markdown_table(["labeled"] + names, rows, ["---"] + ["---:"] * len(names)), "", "Encoders:", ""]
    for name, info in result["encoders"].items():
        mlm = info.get("mlm")
        extra = (f"; held-out masked-token perplexity {mlm['perplexity_before']:.1f} -> {mlm['perplexity_after']:.1f} "
                 f"({mlm['steps']} steps)") if mlm else ""
        lines.append(f"- `{name}`: {info['encoder']}{extra}")
    for name, kept in (result.get("focus_lesion_kept") or {}).items():
        lines.append(f"- `{name}` keeps a sentence naming the lesions in "
                     + ", ".join(f"{100 * v:.0f} % of {k} reports" for k, v in kept.items()))
    checks = result.get("acceptance", {}).get("checks", [])
    if checks:
        lines += ["", "## Acceptance (whole report vs 10-token truncation)", ""]
        for c in checks:
            if c["holds"] is None:
                gaps = ", ".join(f"{100 * float(f):g} %: {g:+.3f}" for f, g in sorted(c["dice_gap_by_budget"].items()))
                lines.append(f"- {c['claim']}: {gaps}")
            else:
                lines.append(f"- {c['claim']}: {c['dice_gap']:+.3f} -> {'holds' if c['holds'] else 'does NOT hold'}")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: Path, name: str, plot: bool = True) -> None:
    common.write_json(out_dir / f"{name}.json", result)
    common.write_text(out_dir / f"{name}.md", markdown(result))
    if plot and result["results"]:
        common.plot_label_efficiency(result, out_dir / f"{name}.png")


def local_encoders(specs: list[str]) -> dict:
    """{label: folder} for the LABEL=DIR encoders, each checked to be a model folder before any work starts."""
    out = {}
    for spec in specs:
        if "=" in spec:
            label, folder = spec.split("=", 1)
            folder = Path(folder).expanduser()
            if not label or label in ENCODERS + EXTRA_ENCODERS:
                raise SystemExit(f"--encoders {spec!r}: give the local encoder a label of its own (LABEL=DIR)")
            if not (folder / "config.json").is_file():
                raise SystemExit(f"--encoders {spec!r}: {folder} is not a model folder (no config.json)")
            out[label] = folder
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Text-encoder comparison on the clinical-reports set.")
    p.add_argument("--quick", action="store_true", help="10/25/50 %% labels, 3 seeds (the acceptance run)")
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS),
                   help=f"from {list(ENCODERS + EXTRA_ENCODERS)}, or LABEL=DIR for a local encoder folder (e.g. a "
                        "clinical ModernBERT), read with the same focus")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--name", help="results file stem (default text_encoders[_quick])")
    p.add_argument("--work", type=Path, help="keep the work folder (data, backbone, encoders) here")
    p.add_argument("--backbone", type=Path, help="reuse a pretrained backbone for this dataset and plan")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--budgets", type=float, nargs="+")
    p.add_argument("--adapt-steps", type=int, default=ADAPT_STEPS)
    p.add_argument("--adapt-steps-long", type=int, default=ADAPT_STEPS_LONG)
    p.add_argument("--text-residual", choices=("plain", "zero", "gate"))
    p.add_argument("--text-dropout", type=float)
    p.add_argument("--text-fallback", choices=("on", "off"))
    p.add_argument("--widths", type=int, nargs="+")
    for opt, typ in (("size", int), ("pretrain-steps", int), ("epochs", int), ("min-steps", int),
                     ("fusion-dim", int), ("n-train", int), ("n-val", int), ("n-test", int)):
        p.add_argument(f"--{opt}", type=typ, default=None)
    p.add_argument("--encoder-dir", type=Path, help="keep/reuse the adapted encoders here (default WORK/encoders): "
                   "processes that run the seeds side by side share one MLM run")
    p.add_argument("--prepare-only", action="store_true", help="only build the encoders (--encoder-dir), no training")
    p.add_argument("--probe", action="store_true",
                   help="only the linear probe: which regions a report names, from frozen MiniLM states "
                        "(-> --out/text_probe.json)")
    p.add_argument("--focus-recall", action="store_true",
                   help="only measure, per focus encoder, how often the kept sentences name the lesions "
                        "(-> --out/text_focus_recall.json)")
    p.add_argument("--place-phrases", action="store_true",
                   help="only ask each encoder (and a shared-words reader) which training place phrase each "
                        "held-out one is nearest (-> --out/text_place_phrases.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--render", type=Path, metavar="JSON", help="only rewrite .md/.png next to a results JSON")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine results JSONs of the same plan (e.g. one per seed) into --out/NAME.* (no training)")
    args = p.parse_args(argv)
    args.local_encoders = local_encoders(args.encoders)
    args.encoders = [e.split("=", 1)[0] for e in args.encoders]
    if args.merge:
        return merge_results(args.merge, args.out, args.name or "text_encoders_merged", plot=not args.no_plot)
    if args.render:
        result = json.loads(args.render.read_text())
        write_outputs(result, args.render.parent, args.render.stem, plot=not args.no_plot)
        return result
    common.set_threads(args.threads)
    plan = QUICK if args.quick else FULL
    changes = {k: getattr(args, k) for k in ("size", "pretrain_steps", "epochs", "min_steps", "fusion_dim", "n_train",
                                              "n_val", "n_test") if getattr(args, k) is not None}
    if args.widths:
        changes["widths"] = tuple(args.widths)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.budgets:
        changes["budgets"] = tuple(args.budgets)
    if args.text_residual:
        changes["text_residual"] = args.text_residual
    if args.text_dropout is not None:
        changes["text_dropout"] = args.text_dropout
    if args.text_fallback:
        changes["text_fallback"] = args.text_fallback == "on"
    plan = replace(plan, **changes)
    name = args.name or "text_encoders" + ("_quick" if args.quick else "")
    command = "python bench/text_encoders.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return _run(args, plan, args.work, command, name)
    with tempfile.TemporaryDirectory(prefix="bench-text-encoders-") as tmp:
        return _run(args, plan, Path(tmp), command, name)


def merge_results(paths: list[Path], out_dir: Path, name: str, plot: bool = True) -> dict:
    """One result from several runs of the same plan: runs concatenated ((encoder, budget, seed) once),
    re-aggregated."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs = common.concat_runs(parts, paths)
    order = list(dict.fromkeys(r["method"] for r in runs))  # the order the encoders ran in
    result = dict(parts[0])
    result.update(name=name, runs=runs, results=aggregate(runs, order),
                  command=" ; ".join(r["command"] for r in parts),
                  encoders={n: info for part in parts for n, info in part["encoders"].items()},
                  complete=all(r.get("complete") for r in parts), seconds=max(r["seconds"] for r in parts),
                  loadavg_end=parts[-1].get("loadavg_end"), merged_from=[str(p) for p in paths],
                  plan={**result["plan"], "seeds": sorted({r["seed"] for r in runs}),
                        "budgets": sorted({r["labeled_fraction"] for r in runs})})
    result["acceptance"] = acceptance(result["results"])
    write_outputs(result, out_dir, name, plot=plot)
    print(markdown(result))
    return result


def _run(args, plan, work: Path, command: str, name: str) -> dict:
    from fasttextdiff.config import TrainConfig
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.training.workflows import load_lvit

    started = time.perf_counter()
    machine = common.machine_info()
    root = make_lvit_dataset(work / "data", variant="clinical-reports", n_train=plan.n_train, n_val=plan.n_val,
                             n_test=plan.n_test, size=plan.size, seed=args.data_seed)
    splits = load_lvit(root)
    if args.probe:
        out = {"command": command, **region_probe(splits)}
        common.write_json(args.out / "text_probe.json", out)
        return out
    if args.encoder_dir:
        args.encoder_dir.mkdir(parents=True, exist_ok=True)
        if not (work / "encoders").exists():
            (work / "encoders").symlink_to(args.encoder_dir.resolve(), target_is_directory=True)
    configs, encoders = prepare_encoders(args.encoders, work, args.adapt_steps, args.adapt_steps_long,
                                         args.local_encoders)
    if args.prepare_only:
        print(json.dumps(encoders, indent=2))
        return {"encoders": encoders}
    if args.place_phrases:
        out = {"command": command, **place_phrases(configs, splits)}
        common.write_json(args.out / "text_place_phrases.json", out)
        return out
    recall = focus_recall(configs, splits)
    if args.focus_recall:
        out = {"command": command, "focus": FOCUS, "kept_sentences": 3, "lesion_kept": recall,
               "split_sizes": {k: len(v) for k, v in splits.items()}}
        common.write_json(args.out / "text_focus_recall.json", out)
        return out
    if args.backbone:
        backbone_dir, pretrain_s = args.backbone, 0.0
    else:
        backbone_dir, pretrain_s = accuracy.pretrain(root, splits, plan, None, work, args.device)
    fusion = accuracy.fusion_config(plan)
    result = {"dataset": "clinical-reports", "name": name, "command": command, "quick": bool(args.quick),
              "description": f"synthetic clinical-reports ({plan.size} px, data seed {args.data_seed}; test split in "
                             "held-out phrasings)",
              "machine": machine,
              "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(plan).items()},
              "fusion": {"text_residual": fusion.text_residual, "text_dropout": fusion.text_dropout,
                         "text_fallback": plan.text_fallback if plan.text_fallback is not None
                         else TrainConfig().text_fallback},
              "split_sizes": [len(splits["train"]), len(splits["val"]), len(splits["test"])],
              "backbone": str(args.backbone) if args.backbone else "pretrained in this run",
              "pretrain_seconds": round(pretrain_s, 1), "encoders": encoders, "focus_lesion_kept": recall,
              "runs": [], "results": [],
              "complete": False}
    for seed in plan.seeds:
        for fraction in sorted(plan.budgets):
            for enc in args.encoders:
                t0 = time.perf_counter()
                method = "no_text" if enc == "no_text" else "fasttextdiff"
                run = accuracy.run_fasttextdiff(method, splits, backbone_dir, plan, fraction, seed, work, args.device,
                                                text_config=configs[enc], encoder_label=enc)
                run.update(method=enc, labeled_fraction=fraction, seed=seed)
                result["runs"].append(run)
                print(f"[text_encoders] seed {seed} {100 * fraction:5.1f}% {enc:18s} test Dice {run['dice']:.3f} "
                      f"(val {run['val_dice']:.3f}, {time.perf_counter() - t0:.0f} s)", flush=True)
                result["results"] = aggregate(result["runs"], args.encoders)
                result["acceptance"] = acceptance(result["results"])
                result["seconds"] = round(time.perf_counter() - started, 1)
                result["loadavg_end"] = common.loadavg()
                write_outputs(result, args.out, name, plot=False)
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["loadavg_end"] = common.loadavg()
    write_outputs(result, args.out, name, plot=not args.no_plot)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
