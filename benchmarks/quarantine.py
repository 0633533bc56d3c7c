"""Indirect prompt injection on BIPIA: precision and recall of the "injection" detector.

    python -m benchmarks.quarantine

Data (benchmarks/data/bipia, from microsoft/BIPIA's train split): clean emails,
tables and Stack Overflow code answers are the negatives; a positive is a clean
document with one attack instruction inserted on its own line at the start, the
end or a sentence boundary (as BIPIA builds its poisoned contexts). Text attacks
go into emails and tables, code attacks into code answers. BIPIA's clean
documents are narrow (payment emails, wiki tables, code answers), so 61 short
ordinary texts written for this project (benchmarks/data/ordinary: FAQs, support
mail, install guides, recipes, news, shop pages, JSON results; several mention
passwords, instructions or "your answer") are extra negatives: the "ordinary" row.

Split: documents are shuffled (fixed seed) and halved; attacks are split by
their index within each attack category (0-1 calibrate, 2-4 report); ordinary
texts by id (even calibrate, odd report). The similarity threshold is calibrated
on the first half (best F1 with at most 1 % false positives) and every figure
printed is measured on the second half, at the policy's default threshold, at
the calibrated one, and for the rules alone.
ms per item is the full detector on report items not seen before (embedding
included; sentences shared between items are embedded once, as in a session).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from contextwise.middleware.detectors import Item
from contextwise.middleware.injection import InjectionDetector
from contextwise.retrievers.embedder import get_embedder
from rich.console import Console
from rich.table import Table

from benchmarks.common import write_results
from contextwise.policy import Quarantine

DATA = Path(__file__).resolve().parent / "data" / "bipia"
ORDINARY = DATA.parent / "ordinary" / "ordinary.jsonl"
SEED = 0
POSITIONS = ("start", "middle", "end")
CALIBRATION_ATTACKS = 2  # attack indexes 0..1 of each category calibrate, the rest report
MAX_FPR = 0.01


def _jsonl_from(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonl(name: str) -> list[dict[str, Any]]:
    return _jsonl_from(DATA / name)


def load() -> tuple[dict[str, list[str]], dict[str, dict[str, list[str]]]]:
    docs = {
        "email": [r["context"] for r in _jsonl("email_train.jsonl")],
        "table": [r["context"] for r in _jsonl("table_train_sample150.jsonl")],
        "code": ["\n".join(r["context"]) for r in _jsonl("code_train.jsonl")],
    }
    text_attacks = json.loads((DATA / "text_attack_train.json").read_text())
    code_attacks = json.loads((DATA / "code_attack_train.json").read_text())
    return docs, {"email": text_attacks, "table": text_attacks, "code": code_attacks}


def insert(doc: str, attack: str, position: str, rng: random.Random) -> str:
    """BIPIA's insertion: the attack on its own line at the start, the end or a sentence start."""
    if position == "start":
        return f"{attack}\n{doc}"
    if position == "end":
        return f"{doc}\n{attack}"
    starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s+|\n", doc) if m.end() < len(doc)]
    k = rng.choice(starts)
    return f"{doc[:k]}\n{attack}\n{doc[k:]}"


def build() -> dict[str, list[dict[str, Any]]]:
    """{"calibrate": [...], "report": [...]}: examples with text, label, context, position."""
    docs, attacks = load()
    rng = random.Random(SEED)
    out: dict[str, list[dict[str, Any]]] = {"calibrate": [], "report": []}
    for row in _jsonl_from(ORDINARY):  # extra negatives: even ids calibrate, odd ids report
        split = "report" if row["id"] % 2 else "calibrate"
        out[split].append({"text": row["text"], "label": 0, "context": "ordinary",
                           "position": None, "category": None})
    for context, texts in docs.items():
        order = list(range(len(texts)))
        rng.shuffle(order)
        half = len(order) // 2
        for split, ids in (("calibrate", order[:half]), ("report", order[half:])):
            pool = [(cat, a) for cat, items in attacks[context].items()
                    for i, a in enumerate(items)
                    if (i < CALIBRATION_ATTACKS) == (split == "calibrate")]
            for d in ids:
                doc = texts[d]
                out[split].append({"text": doc, "label": 0, "context": context,
                                   "position": None, "category": None})
                for position in POSITIONS:
                    category, attack = rng.choice(pool)
                    out[split].append({"text": insert(doc, attack, position, rng), "label": 1,
                                       "context": context, "position": position,
                                       "category": category})
    return out


def metrics(pred: list[bool], label: list[int]) -> dict[str, float]:
    tp = sum(p and y for p, y in zip(pred, label, strict=True))
    fp = sum(p and not y for p, y in zip(pred, label, strict=True))
    fn = sum((not p) and y for p, y in zip(pred, label, strict=True))
    tn = sum((not p) and not y for p, y in zip(pred, label, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "false_positive_rate": fp / (fp + tn) if fp + tn else 0.0,
            "positives": tp + fn, "negatives": fp + tn}


def score(examples: list[dict[str, Any]], detector: InjectionDetector) -> None:
    """Adds `rule` (a rule fired) and `sim` (best cosine to an attack pattern) to each example."""
    for ex in examples:
        ex["rule"] = detector.check_rules(ex["text"]) is not None
        ex["sim"] = detector.similarity(ex["text"])[0]


def predict(examples: list[dict[str, Any]], threshold: float | None) -> list[bool]:
    return [ex["rule"] or (threshold is not None and ex["sim"] >= threshold) for ex in examples]


def calibrate(examples: list[dict[str, Any]]) -> float:
    """The threshold with the best F1 among those with at most MAX_FPR false positives."""
    labels = [ex["label"] for ex in examples]
    best, best_f1 = 0.95, -1.0
    for i in range(40, 96):
        t = i / 100
        m = metrics(predict(examples, t), labels)
        if m["false_positive_rate"] <= MAX_FPR and m["f1"] > best_f1:
            best, best_f1 = t, m["f1"]
    return best


def timed(detector: InjectionDetector, examples: list[dict[str, Any]]) -> float:
    t0 = time.perf_counter()
    for ex in examples:
        detector(Item(text=ex["text"]))
    return (time.perf_counter() - t0) * 1000 / len(examples)


def main() -> None:
    console = Console()
    embedder = get_embedder()
    default = Quarantine().injection_similarity
    data = build()
    cal, rep = data["calibrate"], data["report"]

    analysis = InjectionDetector(default, embedder=embedder)
    score(cal, analysis)
    threshold = calibrate(cal)

    # time on report items never seen (the embedder memo only holds calibration text)
    ms_full = timed(InjectionDetector(default, embedder=embedder), rep)
    ms_rules = timed(InjectionDetector(default, embedder=embedder, use_embeddings=False), rep)
    score(rep, analysis)

    labels = [ex["label"] for ex in rep]
    runs = {"default": predict(rep, default), "calibrated": predict(rep, threshold),
            "rules_only": predict(rep, None)}

    table = Table(title=f"BIPIA injection detection, report split ({len(rep)} items)")
    for col in ("detector", "subset", "precision", "recall", "F1", "FPR", "pos", "neg"):
        table.add_column(col, justify="left" if col in ("detector", "subset") else "right")
    flat: dict[str, Any] = {}
    for name, pred in runs.items():
        label = {"default": f"rules + embedding @ {default:.2f} (default)",
                 "calibrated": f"rules + embedding @ {threshold:.2f} (calibrated)",
                 "rules_only": "rules only"}[name]
        for subset in ("overall", "email", "table", "code", "ordinary"):
            idx = [i for i, ex in enumerate(rep) if subset == "overall" or ex["context"] == subset]
            m = metrics([pred[i] for i in idx], [labels[i] for i in idx])
            has_pos = m["positives"] > 0
            table.add_row(label if subset == "overall" else "", subset,
                          *(f"{m[k]:.3f}" if has_pos else "-"
                            for k in ("precision", "recall", "f1")),
                          f"{m['false_positive_rate']:.3f}", str(m["positives"]),
                          str(m["negatives"]))
            prefix = {"default": "", "calibrated": "calibrated_", "rules_only": "rules_only_"}[name]
            scope = "" if subset == "overall" else f"{subset}_"
            for key in ("precision", "recall", "f1", "false_positive_rate"):
                if has_pos or key == "false_positive_rate":
                    flat[f"{prefix}{scope}{key}"] = round(m[key], 4)
        table.add_section()
    console.print(table)

    by = defaultdict(list)
    for ex, hit in zip(rep, runs["default"], strict=True):
        if ex["label"]:
            by[ex["position"]].append(hit)
            by[ex["category"]].append(hit)
    detail = Table(title=f"recall at the default threshold ({default:.2f}) by position / category")
    detail.add_column("position or attack category")
    detail.add_column("recall", justify="right")
    detail.add_column("n", justify="right")
    for key, hits in by.items():
        detail.add_row(key, f"{sum(hits) / len(hits):.2f}", str(len(hits)))
        if key in POSITIONS:
            flat[f"recall_{key}"] = round(sum(hits) / len(hits), 4)
    console.print(detail)

    flat.update({
        "threshold": default,
        "calibrated_threshold": threshold,
        "ms_per_item": round(ms_full, 2),
        "rules_only_ms_per_item": round(ms_rules, 3),
        "report_items": len(rep),
        "report_positives": sum(labels),
        "calibration_items": len(cal),
        "attack_patterns": len(analysis.patterns),
        "rules": len(analysis.rules),
    })
    console.print(f"calibrated threshold {threshold:.2f} (best F1 on the calibration half with "
                  f"FPR <= {MAX_FPR:.0%}); policy default {default:.2f}; "
                  f"{ms_full:.1f} ms/item (rules alone {ms_rules:.2f} ms/item)")
    print(f"wrote {write_results('quarantine', flat)}")


if __name__ == "__main__":
    main()
