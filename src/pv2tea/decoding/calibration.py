"""How far to trust the model against the extractor, per attribute, from a small gold sample — with a guard.

Late fusion (:mod:`pv2tea.decoding.fusion`) ranks a row's candidate values C by the model and the text extractor
together. How much the model should weigh differs by attribute: on some it reads what the extractor cannot (a value
only the image shows), on others it is worse than the extractor it learned from. Calibration picks, per attribute,
the model's share λ in

    score(c) = λ · log p_model(c | C) + (1 − λ) · log q_extractor(c | C)

(both renormalized over C; λ = 0 is the extractor alone, λ = 1 the model alone) from a grid, by the rows of a
gold sample it answers right, and keeps a λ > 0 only where the gain over the extractor is beyond noise.

Rows can be weighed so that each gold value counts as much as any other (``objective = "balanced"``): a row's
weight is inversely proportional to how many sample rows of its attribute share its gold value, so the
weighted share of right rows is the balanced accuracy — the mean over values of their recall, which is what the
macro-F1 over values that pv2tea reports rewards. Counting rows alike (``objective = "accuracy"``, the default)
favours the extractor's answers on the frequent values; on a large gold sample of an unbalanced catalogue, balanced
weights picked better λ, but on a sample of a few dozen rows a rare value's one or two rows decide, and they picked
worse (docs/method/decisions.md). With ``fixed`` the weight of the sample rows right under λ and wrong under the extractor, ``broke`` the
reverse, and ``spread`` the sum of their squared weights, λ is kept when

    fixed − broke ≥ z · √spread

(a sign test on the discordant rows, as in McNemar's test, each row counted with its weight: under no difference
each discordant row adds ±its weight with equal odds; with equal weights spread = fixed + broke; z = 1 by
default). Otherwise λ = 0: on that attribute the deployed answer is the extractor's, so the deployed system is never
below the extractor beyond the noise of the sample. Ties between grid values go to the smaller λ (closer to the
extractor). Attributes with fewer than ``min_rows`` sample rows, and attributes the sample does not hold, share one
λ chosen the same way on the whole sample (``pooled``, where a value is an attribute's value).

Selection scores per-row outcomes rather than the macro-F1 itself: per-row outcomes are what a paired test can
judge, and macro-F1 over a few dozen rows per attribute moves by whole points with one row.

The photo is trusted per attribute the same way. When the sample's rows are also scored by the model with their
photos withheld (``ScoredRow.model_text``), λ is chosen for both, and the photo is kept for an attribute only when
the deployed answers with it beat those without it beyond noise on the sample (the same sign test, on the rows where
the two differ); otherwise that attribute is answered from the product's text, the model reading no photo. A model
can learn from weak labels to read a photo well for one attribute (sleeve length) and badly for another (colour
under a frozen backbone): the sample decides which.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np

from pv2tea.eval.normalize import normalize_value

FORMAT = "pv2tea-calibration"
FORMAT_VERSION = 2  # 2: config.objective and the choices' scores (version 1 files chose by accuracy)
DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


Objective = Literal["balanced", "accuracy"]


class CalibrationError(ValueError):
    """A calibration file or sample that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration chooses.

    Attributes:
        grid: the model shares λ tried (each in [0, 1]; 0 is always tried: the extractor alone).
        z: the guard's threshold in standard errors of the discordant-row sign test (0: keep any gain).
        min_rows: an attribute with fewer sample rows takes the pooled λ.
        objective: what a λ is chosen by: ``balanced`` (each gold value weighs alike: balanced accuracy, the
            per-row proxy of macro-F1 over values) or ``accuracy`` (each row alike).
    """

    grid: tuple[float, ...] = DEFAULT_GRID
    z: float = 1.0
    min_rows: int = 20
    objective: Objective = "accuracy"

    def __post_init__(self) -> None:
        if not self.grid or any(not (0.0 <= g <= 1.0) or not math.isfinite(g) for g in self.grid):
            raise ValueError(f"calibration grid values must lie in [0, 1], got {list(self.grid)}")
        if not math.isfinite(self.z) or self.z < 0:
            raise ValueError(f"calibration z must be a finite number >= 0, got {self.z}")
        if self.min_rows < 1:
            raise ValueError(f"calibration min_rows must be >= 1, got {self.min_rows}")
        if self.objective not in get_args(Objective):
            raise ValueError(
                f"calibration objective must be one of {', '.join(get_args(Objective))}, got {self.objective!r}"
            )


@dataclass(frozen=True)
class ScoredRow:
    """One gold-labelled row: its candidates, the model's and the extractor's log-probabilities over them."""

    attribute: str
    candidates: tuple[str, ...]
    model: np.ndarray  # (C,) log p_model(c | C)
    extractor: np.ndarray  # (C,) log q_extractor(c | C)
    gold: frozenset[str]  # normalized gold values
    model_text: np.ndarray | None = None  # (C,) log p_model(c | C) with the row's photos withheld; None: not scored

    def __post_init__(self) -> None:
        n = len(self.candidates)
        if (
            n == 0
            or len(self.model) != n
            or len(self.extractor) != n
            or not (self.model_text is None or len(self.model_text) == n)
        ):
            raise ValueError(
                f"a scored row needs one model and one extractor score per candidate: {n} candidates, "
                f"{len(self.model)} model and {len(self.extractor)} extractor scores"
            )


@dataclass(frozen=True)
class Choice:
    """The λ chosen for one attribute (or the pooled sample) and the sample evidence behind it."""

    model_weight: float  # λ deployed (0 when the guard refused the best λ)
    best_weight: float  # the best λ on the sample, before the guard
    rows: int
    extractor_correct: int
    fused_correct: int  # at best_weight
    fixed: int  # rows right at best_weight and wrong under the extractor
    broke: int  # the reverse
    accepted: bool  # best_weight > 0 and it passed the guard (on the weighted rows)
    source: str = "attribute"  # "attribute", or "pooled" when the attribute took the pooled λ
    # the model reads the photo (True), or answers with the photo withheld because, with it, it was not better beyond
    # noise on the sample; image_fixed / image_broke: rows right with the photo and wrong without it, and the reverse
    image: bool = True
    image_fixed: int = 0
    image_broke: int = 0
    # the objective on the sample, in %, of the extractor alone and of the deployed answers (None: not recorded)
    extractor_score: float | None = None
    fused_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The choice as a JSON object (its fields)."""
        return asdict(self)


@dataclass(frozen=True)
class Calibration:
    """Per-attribute model shares λ for late fusion; attributes not listed take ``pooled``.

    Made by ``pv2tea calibrate`` (:func:`fit_calibration` on labelled rows), saved as JSON with :meth:`save`, read
    with :func:`load_calibration` and passed to :meth:`Predictor.predict
    <pv2tea.inference.predictor.Predictor.predict>`, which then ranks an attribute's candidates by
    λ · log p_model + (1 − λ) · log q_extractor.

    Attributes:
        pooled: The choice over all the sample's rows, for attributes without their own.
        attributes: Attribute -> its own choice.
        config: The grid of λ, the guard's z and the fewest rows an attribute needs for its own λ.
        meta: What the file records besides (the model, extractor and data it was fitted on, the date).
    """

    pooled: Choice
    attributes: Mapping[str, Choice]
    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def choice(self, attribute: str) -> Choice:
        """The choice for ``attribute`` (its own, else the pooled one)."""
        choice = self.attributes.get(attribute)
        return choice if choice is not None else self.pooled

    def model_weight(self, attribute: str) -> float:
        """The model's share λ for ``attribute`` (its own choice, else the pooled one)."""
        return self.choice(attribute).model_weight

    def uses_image(self, attribute: str) -> bool:
        """Whether the model reads the photo for ``attribute`` (else it answers from the text alone)."""
        return self.choice(attribute).image

    def to_json(self) -> dict[str, Any]:
        """The calibration file's JSON object (format, version, config, pooled and per-attribute choices)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **dict(self.meta),
            "config": {
                "grid": list(self.config.grid),
                "z": self.config.z,
                "min_rows": self.config.min_rows,
                "objective": self.config.objective,
            },
            "pooled": self.pooled.to_json(),
            "attributes": {a: c.to_json() for a, c in sorted(self.attributes.items())},
        }

    def save(self, path: str | Path) -> Path:
        """Write the calibration file atomically (parent folders created).

        Args:
            path: The JSON file to write.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False))
        tmp.replace(path)
        return path


def fused_pick(row: ScoredRow, model_weight: float, image: bool = True) -> int:
    """Index of the candidate with the highest λ · log p_model + (1 − λ) · log q_extractor (first on ties); the
    model's scores with the photo (``image``) or, when the row has them, with the photo withheld."""
    model = row.model if image or row.model_text is None else row.model_text
    scores = model_weight * model + (1.0 - model_weight) * row.extractor
    return int(np.argmax(scores))


def _correct(rows: Sequence[ScoredRow], model_weight: float, image: bool = True) -> np.ndarray:
    return np.array(
        [normalize_value(r.candidates[fused_pick(r, model_weight, image)]) in r.gold for r in rows], dtype=bool
    )


def row_weights(rows: Sequence[ScoredRow], objective: Objective) -> np.ndarray:
    """(N,) each row's weight in the choice, with mean 1: all 1 for ``accuracy``; for ``balanced``, inversely
    proportional to the number of rows with the row's attribute and gold value(s), so each value weighs alike."""
    if objective == "accuracy" or not rows:
        return np.ones(len(rows))
    keys = [(r.attribute, tuple(sorted(r.gold))) for r in rows]
    counts = Counter(keys)
    weights = np.array([1.0 / counts[k] for k in keys])
    return weights * (len(rows) / weights.sum())


def passes_guard(fixed: float, broke: float, z: float, spread: float | None = None) -> bool:
    """A gain over the extractor beyond noise: fixed − broke ≥ z · √spread, and strictly positive. ``fixed`` and
    ``broke``: the (weighted) discordant rows; ``spread``: the sum of their squared weights (default fixed + broke,
    each row weighing 1)."""
    gain = fixed - broke
    spread = fixed + broke if spread is None else spread
    return gain > 1e-9 and gain >= z * math.sqrt(spread) - 1e-9


def _weighted_guard(better: np.ndarray, worse: np.ndarray, weights: np.ndarray, z: float) -> bool:
    """:func:`passes_guard` on the rows right only in ``better`` against those right only in ``worse``."""
    fixed, broke = better & ~worse, worse & ~better
    spread = float((weights[fixed | broke] ** 2).sum())
    return passes_guard(float(weights[fixed].sum()), float(weights[broke].sum()), z, spread)


def _score(hits: np.ndarray, weights: np.ndarray) -> float:
    """The weighted share of right rows, in %."""
    return 100.0 * float(weights[hits].sum() / weights.sum()) if len(hits) else 0.0


def _guarded(
    rows: Sequence[ScoredRow], config: CalibrationConfig, weights: np.ndarray, image: bool, source: str
) -> tuple[Choice, np.ndarray]:
    """The guarded λ against the extractor for the model's scores with (``image``) or without the photo, and the
    rows its deployed answer gets right; rows weighed by ``weights``."""
    base = _correct(rows, 0.0)
    best_w, best = 0.0, base
    for w in sorted(set(config.grid) | {0.0}):
        hits = base if w == 0.0 else _correct(rows, w, image)
        if weights[hits].sum() > weights[best].sum() + 1e-9:  # strictly better: ties stay with the smaller λ
            best_w, best = w, hits
    fixed = int((best & ~base).sum())
    broke = int((base & ~best).sum())
    accepted = best_w > 0 and _weighted_guard(best, base, weights, config.z)
    deployed = best if accepted else base
    choice = Choice(
        best_w if accepted else 0.0,
        best_w,
        len(rows),
        int(base.sum()),
        int(best.sum()),
        fixed,
        broke,
        accepted,
        source,
        image,
        extractor_score=_score(base, weights),
        fused_score=_score(deployed, weights),
    )
    return choice, deployed


def choose(rows: Sequence[ScoredRow], config: CalibrationConfig, source: str = "attribute") -> Choice:
    """The guarded λ for ``rows``, and whether the model reads the photo (see the module docstring)."""
    if not rows:
        return Choice(0.0, 0.0, 0, 0, 0, 0, 0, False, source)
    weights = row_weights(rows, config.objective)
    with_image, hits_image = _guarded(rows, config, weights, True, source)
    if any(r.model_text is None for r in rows):  # no scores without the photo to weigh it against
        return with_image
    without, hits_text = _guarded(rows, config, weights, False, source)
    fixed = int((hits_image & ~hits_text).sum())
    broke = int((hits_text & ~hits_image).sum())
    keep = _weighted_guard(hits_image, hits_text, weights, config.z)
    return replace(with_image if keep else without, image=keep, image_fixed=fixed, image_broke=broke)


def fit_calibration(
    rows: Sequence[ScoredRow], config: CalibrationConfig | None = None, meta: Mapping[str, Any] | None = None
) -> Calibration:
    """Per-attribute guarded λ from a gold sample; small attributes take the pooled choice."""
    config = config or CalibrationConfig()
    if not rows:
        raise CalibrationError("calibration needs at least one gold row with a candidate list")
    pooled = choose(rows, config, source="pooled")
    by_attribute: dict[str, list[ScoredRow]] = {}
    for r in rows:
        by_attribute.setdefault(r.attribute, []).append(r)
    attributes = {}
    for attribute, group in by_attribute.items():
        if len(group) >= config.min_rows:
            attributes[attribute] = choose(group, config)
        else:  # too few rows to judge alone: the pooled λ, with this attribute's own counts under it
            base, fused = _correct(group, 0.0), _correct(group, pooled.model_weight, pooled.image)
            weights = row_weights(group, config.objective)
            attributes[attribute] = replace(
                pooled,
                rows=len(group),
                extractor_correct=int(base.sum()),
                fused_correct=int(fused.sum()),
                fixed=int((fused & ~base).sum()),
                broke=int((base & ~fused).sum()),
                image_fixed=0,
                image_broke=0,
                extractor_score=_score(base, weights),
                fused_score=_score(fused, weights),
            )
    return Calibration(pooled, attributes, config, dict(meta or {}))


def calibrated_answer(row: ScoredRow, calibration: Calibration) -> str:
    """The deployed answer of a row: its candidate with the highest fused score under its attribute's λ, the model's
    scores with or without the photo as the calibration chose for the attribute."""
    choice = calibration.choice(row.attribute)
    return row.candidates[fused_pick(row, choice.model_weight, choice.image)]


def apply_calibration(rows: Sequence[ScoredRow], calibration: Calibration) -> list[str]:
    """The deployed answer of each row (:func:`calibrated_answer`)."""
    return [calibrated_answer(r, calibration) for r in rows]


def scored_rows(
    records: Sequence[Any],
    model_scores: Sequence[tuple[Sequence[str], np.ndarray] | None],
    priors: Sequence[Mapping[str, float]],
    text_scores: Sequence[tuple[Sequence[str], np.ndarray] | None] | None = None,
) -> tuple[list[ScoredRow], list[int]]:
    """The records as :class:`ScoredRow` (their ``gold`` normalized; the extractor's ``priors`` renormalized over each
    row's candidates, :func:`pv2tea.decoding.fusion.prior_log_probs`), from the model's candidate log-probabilities
    (:meth:`pv2tea.inference.predictor.Predictor.candidate_log_probs`). Returns (rows, indices of the records left
    out: no candidate list for their attribute). ``text_scores``: the same model's scores with the photos withheld, per
    record (the rows then weigh the photo, :func:`choose`)."""
    from pv2tea.decoding.fusion import prior_log_probs

    if not len(records) == len(model_scores) == len(priors):
        raise ValueError(f"{len(records)} records, {len(model_scores)} model scores and {len(priors)} priors")
    if text_scores is not None and len(text_scores) != len(records):
        raise ValueError(f"{len(records)} records and {len(text_scores)} scores without photos")
    rows, skipped = [], []
    for i, (record, scored, prior) in enumerate(zip(records, model_scores, priors)):
        if scored is None:
            skipped.append(i)
            continue
        cands, model_lp = scored
        text = None if text_scores is None else text_scores[i]
        if text is not None and list(text[0]) != list(cands):
            raise ValueError(f"record {i}: the scores with and without photos rank different candidates")
        rows.append(
            ScoredRow(
                record.attribute,
                tuple(cands),
                np.asarray(model_lp, dtype=np.float64),
                prior_log_probs(cands, prior),
                frozenset(normalize_value(g) for g in (record.gold or ())),
                None if text is None else np.asarray(text[1], dtype=np.float64),
            )
        )
    return rows, skipped


def _choice_from_json(data: Any, where: str) -> Choice:
    if not isinstance(data, Mapping):
        raise CalibrationError(f"{where}: expected an object, got {type(data).__name__}")
    try:
        choice = Choice(**{k: data[k] for k in Choice.__dataclass_fields__ if k in data})
    except TypeError as exc:
        raise CalibrationError(f"{where}: {exc}") from exc
    if not isinstance(choice.image, bool):
        raise CalibrationError(f"{where}.image: expected true or false, got {choice.image!r}")
    w = choice.model_weight
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0.0 <= float(w) <= 1.0:
        raise CalibrationError(f"{where}.model_weight: expected a number in [0, 1], got {w!r}")
    return choice


def _upgraded(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A calibration file's object in the current version: a version 1 file chose by accuracy (its λ and photo
    choices stand as they are); any other version than those this pv2tea knows is refused."""
    version = data.get("version")
    if version == 1:
        data = {**data, "version": 2, "config": {**(data.get("config") or {}), "objective": "accuracy"}}
        version = 2
    if version != FORMAT_VERSION:
        raise CalibrationError(
            f"calibration file {path}: version {data.get('version')!r}, this pv2tea reads versions 1 to "
            f"{FORMAT_VERSION}; run `pv2tea calibrate` again"
        )
    return data


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by :meth:`Calibration.save` (``pv2tea calibrate``).

    Args:
        path: The JSON file.

    Returns:
        The calibration, for :meth:`Predictor.predict <pv2tea.inference.predictor.Predictor.predict>`.

    Raises:
        FileNotFoundError: There is no such file.
        CalibrationError: It is not a pv2tea calibration file, is of another version, or a field is malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"calibration file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(
            f'calibration file {path}: not a pv2tea calibration (no "format": "{FORMAT}"); '
            f"make one with `pv2tea calibrate`"
        )
    data = _upgraded(data, path)
    cfg = data.get("config") or {}
    objective = cfg.get("objective")
    if objective not in get_args(Objective):
        raise CalibrationError(
            f"calibration file {path}: config.objective must be one of {', '.join(get_args(Objective))}, "
            f"got {objective!r}"
        )
    try:
        config = CalibrationConfig(
            grid=tuple(cfg.get("grid", DEFAULT_GRID)),
            z=float(cfg.get("z", 1.0)),
            min_rows=int(cfg.get("min_rows", 20)),
            objective=cast(Objective, objective),
        )
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"calibration file {path}: config: {exc}") from exc
    attributes = data.get("attributes")
    if not isinstance(attributes, Mapping):
        raise CalibrationError(f"calibration file {path}: 'attributes' must be an object")
    meta = {k: v for k, v in data.items() if k not in ("format", "version", "config", "pooled", "attributes")}
    return Calibration(
        _choice_from_json(data.get("pooled"), f"{path}: pooled"),
        {a: _choice_from_json(c, f"{path}: attributes.{a}") for a, c in attributes.items()},
        config,
        meta,
    )


def today() -> str:
    """Today's date in ISO format (the ``created`` date of a calibration file)."""
    return _dt.date.today().isoformat()
