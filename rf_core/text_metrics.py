"""Built-in metrics over generated texts, computed offline: ROUGE-L (Google's `rouge-score`, stemmed, F-measure),
corpus BLEU (`sacrebleu`, 0-100) and exact match (after stripping surrounding whitespace).

A config names one in `compute_metrics` ("rougeL", "bleu", "exact_match") together with `predict_with_generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rf_core.functions import BUILTIN_METRICS


def text_metric(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Score `predictions` against `references` (same length, one reference each) by built-in metric `name`."""
    if name not in BUILTIN_METRICS:
        raise ValueError(f"no built-in metric {name!r} (known: {', '.join(BUILTIN_METRICS)})")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError(f"{name}: nothing to score")
    if name == "exact_match":
        return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(predictions)
    if name == "bleu":
        import sacrebleu

        return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)
