"""Prognosis on frozen global features (the ``prog`` family).

Two kinds of protocol:

* A binary target (prog/stoic-severity: severe outcome, rows already filtered to
  ``covid = 1`` by the split) is a binary linear probe, so it is delegated to
  ``LinearProbe`` unchanged: same standardisation, C grid, selection and units.
* Survival columns and no target (prog/inspect-mortality), head ``cox_and_logistic``:

  - Features are standardised with statistics of the regime's training subset only,
    shared by both heads.
  - Cox head: lifelines' ``CoxPHFitter(penalizer=p, l1_ratio=...)`` on (time, event).
    Encoder features (512-1024 dims) can outnumber the training events, where even a
    ridge Cox fit is slow and badly conditioned; so when the feature dimension exceeds
    ``cox.pca_components`` (default 64, capped at n_train - 1) the features are first
    projected on that many principal components, PCA fitted on the training subset
    only. ``pca_components: null`` turns the reduction off. Constant training columns
    (no information, and they break lifelines' internal normalisation) are dropped.
    Every penaliser of the grid is fitted; the one with the best validation C-index is
    kept (ties go to the larger penaliser), and test is scored once.
    Risk = the log partial hazard, higher = earlier event.
  - Horizon heads: per horizon label column, the linear probe's logistic-regression
    path (``fit_path``) on the cases not censored before that horizon, C chosen per
    horizon on the validation AUC at that horizon (ties go to the smaller C).

Not implementable as written: the protocol's comment asks for Breslow ties, but
lifelines' ``CoxPHFitter`` handles tied event times by Efron's method only (its
``baseline_estimation_method="breslow"`` is the baseline hazard, not the ties). With
few ties, as with times in days, the two agree closely. ``drop_censored: false`` is
refused: a case censored before a horizon has no known status there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning as LifelinesConvergenceWarning
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from ..data.cards import Survival
from ..data.manifest import Manifest
from ..metrics.classification import Metric
from ..metrics.survival import c_index, horizon_auc, score_survival
from ..protocol import Protocol
from .base import TaskFamily, TaskInputs, TaskResult
from .selection import choose, default_value
from .linear_probe import DEFAULT_C_GRID, LinearProbe, ProbeParams, feature_matrix, fit_path

HEAD_KIND = "cox_and_logistic"
TOP_PARAMS = {"standardize", "cox", "logistic"}
COX_PARAMS = {"model", "l1_ratio", "penalizer_grid", "select_on", "max_iter", "pca_components"}
LOGISTIC_PARAMS = {"horizons", "C_grid", "select_on", "drop_censored", "max_iter", "tol", "class_weight"}
DEFAULT_PENALIZER_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_PCA_COMPONENTS = 64


@dataclass(frozen=True)
class CoxParams:
    penalizer_grid: tuple[float, ...]
    l1_ratio: float = 0.0
    max_iter: int = 200
    pca_components: int | None = DEFAULT_PCA_COMPONENTS


@dataclass(frozen=True)
class SurvivalParams:
    """The head parameters of a survival protocol, checked against the table's survival columns."""

    standardize: bool
    cox: CoxParams | None
    horizons: dict[str, str]  # metric name -> horizon label column
    probe: ProbeParams | None

    @classmethod
    def from_protocol(cls, protocol: Protocol, survival: Survival) -> "SurvivalParams":
        pid, head = protocol.id, protocol.head
        if head.kind != HEAD_KIND:
            raise ValueError(f"{pid}: a survival protocol has head kind {HEAD_KIND!r}, not {head.kind!r}")
        params = dict(head.params)
        _known(pid, "head params", params, TOP_PARAMS)
        cox = _cox_params(pid, params["cox"]) if "cox" in params else None
        horizons, probe = _logistic_params(pid, params.get("logistic"), survival,
                                           bool(params.get("standardize", True)))
        for metric in protocol.metrics:
            if metric == "c_index" and cox is None:
                raise ValueError(f"{pid}: metric 'c_index' needs a 'cox' section in head params")
            if metric != "c_index" and metric not in horizons:
                raise ValueError(f"{pid}: metric {metric!r} is neither 'c_index' nor a horizon of "
                                 f"logistic.horizons {sorted(horizons)}")
        return cls(bool(params.get("standardize", True)), cox, horizons, probe)


def _known(pid: str, what: str, params: dict, allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"{pid}: unknown {what} {unknown}; the prognosis family reads {sorted(allowed)}")


def _grid(pid: str, name: str, values, default, allow_zero: bool = False) -> tuple[float, ...]:
    grid = tuple(sorted({float(v) for v in (default if values is None else values)}))
    ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if not grid or any(not (ok(v) and math.isfinite(v)) for v in grid):
        raise ValueError(f"{pid}: {name} must list {'non-negative' if allow_zero else 'positive'} numbers, "
                         f"got {values!r}")
    return grid


def _cox_params(pid: str, raw: Any) -> CoxParams:
    if not isinstance(raw, dict):
        raise ValueError(f"{pid}: head params 'cox' must be a mapping, got {raw!r}")
    _known(pid, "cox params", raw, COX_PARAMS)
    if raw.get("model", "coxph") != "coxph":
        raise ValueError(f"{pid}: cox.model must be 'coxph' (lifelines CoxPHFitter), got {raw['model']!r}")
    if raw.get("select_on", "val") != "val":
        raise ValueError(f"{pid}: cox.select_on must be 'val' (the penaliser is never chosen on test)")
    l1 = float(raw.get("l1_ratio", 0.0))
    if not 0.0 <= l1 <= 1.0:
        raise ValueError(f"{pid}: cox.l1_ratio must lie in [0, 1], got {l1}")
    components = raw.get("pca_components", DEFAULT_PCA_COMPONENTS)
    if components is not None and (isinstance(components, bool) or not isinstance(components, int) or components < 1):
        raise ValueError(f"{pid}: cox.pca_components must be a positive integer or null, got {components!r}")
    max_iter = int(raw.get("max_iter", 200))
    if max_iter < 1:
        raise ValueError(f"{pid}: cox.max_iter must be positive, got {max_iter}")
    grid = _grid(pid, "cox.penalizer_grid", raw.get("penalizer_grid"), DEFAULT_PENALIZER_GRID, allow_zero=True)
    return CoxParams(grid, l1, max_iter, components)


def _logistic_params(pid: str, raw: Any, survival: Survival,
                     standardize: bool) -> tuple[dict[str, str], ProbeParams | None]:
    if raw is None:
        return {}, None
    if not isinstance(raw, dict):
        raise ValueError(f"{pid}: head params 'logistic' must be a mapping, got {raw!r}")
    _known(pid, "logistic params", raw, LOGISTIC_PARAMS)
    if raw.get("select_on", "val") != "val":
        raise ValueError(f"{pid}: logistic.select_on must be 'val' (C is never chosen on test)")
    if raw.get("drop_censored", True) is not True:
        raise ValueError(f"{pid}: logistic.drop_censored must be true: a case censored before a horizon has "
                         "no known status there, and counting it as a survivor would bias the AUC")
    horizons = raw.get("horizons") or {}
    if not isinstance(horizons, dict) or not horizons:
        raise ValueError(f"{pid}: logistic.horizons maps metric names to horizon label columns, got {horizons!r}")
    for metric, column in horizons.items():
        if column not in survival.horizons:
            raise ValueError(f"{pid}: logistic.horizons[{metric!r}] = {column!r} is not a horizon column of the "
                             f"dataset (it has {sorted(survival.horizons)})")
    weight = raw.get("class_weight")
    if weight is not None and weight != "balanced":
        raise ValueError(f"{pid}: logistic.class_weight must be 'balanced' or absent, got {weight!r}")
    probe = ProbeParams(c_grid=_grid(pid, "logistic.C_grid", raw.get("C_grid"), DEFAULT_C_GRID),
                        standardize=standardize, max_iter=int(raw.get("max_iter", 1000)),
                        tol=float(raw.get("tol", 1e-4)), class_weight=weight)
    return {str(m): str(c) for m, c in horizons.items()}, probe


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _column(manifest: Manifest, column: str, ids: list[str]) -> np.ndarray:
    return pd.to_numeric(manifest.frame.loc[list(ids), column], errors="coerce").to_numpy(dtype=float)


# ---------------------------------------------------------------------------
# the Cox head
# ---------------------------------------------------------------------------

@dataclass
class CoxInput:
    """Train-fitted map from standardised features to the Cox model's columns (PCA or a column subset)."""

    pca: PCA | None
    keep: np.ndarray | None  # column mask when no PCA

    @classmethod
    def fit(cls, Z: np.ndarray, components: int | None) -> "CoxInput":
        n, dim = Z.shape
        if components is not None and n >= 2 and dim > min(components, n - 1):
            k = min(components, n - 1)
            pca = PCA(n_components=k, svd_solver="full").fit(Z)
            informative = int(np.sum(pca.explained_variance_ > 1e-10 * max(pca.explained_variance_[0], 1e-300)))
            if informative < k:  # rank-deficient features: drop components that carry no variance
                pca = PCA(n_components=max(informative, 1), svd_solver="full").fit(Z)
            return cls(pca, None)
        return cls(None, Z.std(axis=0) > 1e-12)

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        return self.pca.transform(Z) if self.pca is not None else Z[:, self.keep]

    @property
    def dim(self) -> int:
        return int(self.pca.n_components_) if self.pca is not None else int(self.keep.sum())


def _frame(W: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(W, columns=[f"f{j}" for j in range(W.shape[1])])


@dataclass
class CoxPath:
    models: dict[float, CoxPHFitter]  # penaliser -> fitted model (fits that failed are absent)
    failed: dict[float, str]
    warned: dict[float, str]  # lifelines convergence warnings per penaliser

    def risk(self, penalizer: float, W: np.ndarray) -> np.ndarray:
        """Log partial hazard: higher = earlier event."""
        if len(W) == 0:
            return np.empty(0)
        return self.models[penalizer].predict_log_partial_hazard(_frame(W)).to_numpy(dtype=float)


def fit_cox_path(W: np.ndarray, time: np.ndarray, event: np.ndarray, params: CoxParams) -> CoxPath:
    """Fit one penalised Cox model per penaliser of the grid."""
    data = _frame(W).assign(_time=time, _event=event)
    models, failed, warned = {}, {}, {}
    for penalizer in params.penalizer_grid:
        model = CoxPHFitter(penalizer=penalizer, l1_ratio=params.l1_ratio)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model.fit(data, duration_col="_time", event_col="_event",
                          fit_options={"max_steps": params.max_iter})
            except (ConvergenceError, np.linalg.LinAlgError, ValueError, ZeroDivisionError) as err:
                failed[penalizer] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
                continue
        problems = [str(w.message).strip().splitlines()[0] for w in caught
                    if issubclass(w.category, LifelinesConvergenceWarning)]
        if problems:
            warned[penalizer] = problems[-1][:200]
        models[penalizer] = model
    return CoxPath(models, failed, warned)


def _cox_unfittable(n: int, events: int, dim: int) -> str:
    if n < 2:
        return f"the training subset has {n} case(s); a Cox model needs at least two"
    if events == 0:
        return f"the training subset has no observed event ({n} censored case(s))"
    if dim == 0:
        return "every feature is constant on the training subset"
    return ""


# ---------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------

class Prognosis(TaskFamily):
    """Survival prognosis (penalised Cox + per-horizon logistic regression) or a binary-outcome probe."""

    name = "prog"
    needs = "global"

    def run(self, inputs: TaskInputs) -> TaskResult:
        protocol = inputs.protocol
        if inputs.features is None:
            raise ValueError(f"{protocol.id}: the prognosis family needs frozen global features")
        if protocol.data.target is not None:
            return LinearProbe().run(inputs)
        survival = inputs.manifest.table.survival
        if survival is None:
            raise ValueError(f"{protocol.id}: table {inputs.manifest.table_name!r} of {inputs.manifest.dataset!r} "
                             "has no survival columns and the protocol names no target")
        return self._survival(inputs, survival, SurvivalParams.from_protocol(protocol, survival))

    def _survival(self, inputs: TaskInputs, survival: Survival, params: SurvivalParams) -> TaskResult:
        protocol, manifest, split = inputs.protocol, inputs.manifest, inputs.split
        train_ids, val_ids, test_ids = list(inputs.train), list(split.val), list(split.test)
        if not train_ids:
            raise ValueError(f"{protocol.id}: the regime {inputs.ratio} subset of train is empty")
        X_train = feature_matrix(inputs.features, train_ids, "train")
        dim = X_train.shape[1]

        def features(ids: list[str], what: str) -> np.ndarray:
            return feature_matrix(inputs.features, ids, what) if ids else np.empty((0, dim))

        scaler = StandardScaler(with_mean=params.standardize, with_std=params.standardize).fit(X_train)
        Z = {"train": scaler.transform(X_train), "val": scaler.transform(features(val_ids, "val")),
             "test": scaler.transform(features(test_ids, "test"))}
        ids = {"train": train_ids, "val": val_ids, "test": test_ids}
        time = {p: _column(manifest, survival.time, ids[p]) for p in ids}
        event = {p: _column(manifest, survival.event, ids[p]) for p in ids}

        notes: dict[str, str] = {}
        selected: dict[str, Any] = {}
        head_reason: dict[str, str] = {}  # metric -> why its head has no model
        curves: dict[str, dict[str, float | None]] = {}
        wanted = list(protocol.metrics)
        sizes = {"train": len(train_ids), "val": len(val_ids), "test": len(test_ids), "dim": int(dim),
                 "train_events": int(np.nansum(event["train"])), "test_events": int(np.nansum(event["test"]))}

        risk = np.full(len(test_ids), np.nan)
        if "c_index" in wanted:
            risk = self._cox(params.cox, Z, time, event, notes, selected, head_reason, curves, sizes)

        horizon_labels: dict[str, np.ndarray] = {}
        horizon_scores: dict[str, np.ndarray] = {}
        horizon_units: dict[str, dict] = {}
        chosen_c: dict[str, float | None] = {}
        for metric, column in params.horizons.items():
            if metric not in wanted:
                continue
            labels = {p: _column(manifest, column, ids[p]) for p in ids}
            scores, chosen_c[metric] = self._horizon(metric, params.probe, Z, labels, inputs.seed, notes,
                                                     head_reason, curves)
            horizon_labels[metric], horizon_scores[metric] = labels["test"], scores
            horizon_units[metric] = {"column": column, "days": survival.horizons[column],
                                     "labels": [_none(v) for v in labels["test"]],
                                     "scores": [_none(v) for v in scores]}
            sizes[f"test_{metric}"] = int((~np.isnan(labels["test"])).sum())
        if chosen_c:
            selected["C"] = chosen_c

        result = score_survival(time["test"], event["test"], risk, horizon_labels, horizon_scores, wanted)
        for metric, value in result.items():
            if metric in head_reason:
                result[metric] = Metric(float("nan"), head_reason[metric])
            if result[metric].reason:
                notes[metric] = result[metric].reason

        units = {
            "kind": "case", "task": "survival", "ids": test_ids,
            "time": [_none(v) for v in time["test"]], "event": [_none(v) for v in event["test"]],
            "risk": [_none(v) for v in risk],
            "horizons": horizon_units,
            "val_curve": curves,
        }
        return TaskResult(
            metrics={m: (result[m].value if result[m].defined else None) for m in wanted},
            notes=notes, selected=selected, sizes=sizes, units=units,
        )

    def _cox(self, params: CoxParams, Z, time, event, notes, selected, head_reason, curves, sizes) -> np.ndarray:
        """Fit the penaliser grid on train, choose on val, return test risks (NaN when nothing was fitted)."""
        n_test = len(Z["test"])
        reduce = CoxInput.fit(Z["train"], params.pca_components)
        W = {p: reduce(z) for p, z in Z.items()}
        sizes["cox_dim"] = reduce.dim
        selected["cox_pca_components"] = int(reduce.pca.n_components_) if reduce.pca is not None else None
        if reduce.pca is None and reduce.dim < Z["train"].shape[1]:
            notes["cox_features"] = (f"{Z['train'].shape[1] - reduce.dim} feature(s) constant on the training "
                                     "subset were left out of the Cox model")
        selected["penalizer"] = None
        problem = _cox_unfittable(len(W["train"]), int(event["train"].sum()), reduce.dim)
        if problem:
            head_reason["c_index"] = f"{problem}; no Cox model was fitted"
            return np.full(n_test, np.nan)

        path = fit_cox_path(W["train"], time["train"], event["train"], params)
        if not path.models:
            detail = "; ".join(f"{p}: {r}" for p, r in path.failed.items())
            head_reason["c_index"] = f"the Cox fit failed for every penaliser ({detail})"
            return np.full(n_test, np.nan)
        if path.failed:
            notes["cox_failed"] = "; ".join(f"penalizer {p}: {r}" for p, r in path.failed.items())

        curve = {p: c_index(time["val"], path.risk(p, W["val"]), event["val"]).value for p in path.models}
        curves["penalizer"] = {repr(p): _none(v) for p, v in curve.items()}
        chosen = choose(curve, prefer_larger=True)
        if chosen is None:
            fallback = default_value(tuple(path.models))
            reason = c_index(time["val"], np.zeros(len(W["val"])), event["val"]).reason
            notes["penalizer"] = (f"validation C-index is undefined ({reason}); "
                                  f"penalizer={fallback} used without selection")
            chosen = fallback
        if chosen in path.warned:
            notes["cox_convergence"] = f"penalizer={chosen}: {path.warned[chosen]}"
        selected["penalizer"] = chosen
        return path.risk(chosen, W["test"])

    def _horizon(self, metric: str, probe: ProbeParams, Z, labels, seed: int, notes, head_reason,
                 curves) -> tuple[np.ndarray, float | None]:
        """One logistic regression per C on the train cases known at this horizon; C chosen on val AUC."""
        n_test = len(Z["test"])
        path, capped, unfitted = fit_path(Z["train"], labels["train"][:, None], "binary", 1, probe, seed)
        if unfitted:
            head_reason[metric] = f"{unfitted[0]} at this horizon; no model was fitted"
            return np.full(n_test, np.nan), None
        curve = {c: horizon_auc(labels["val"], p.scores(Z["val"])[:, 0], metric).value for c, p in path.items()}
        curves[metric] = {repr(c): _none(v) for c, v in curve.items()}
        chosen = choose(curve, prefer_larger=False)
        if chosen is None:
            chosen = default_value(probe.c_grid)
            reason = horizon_auc(labels["val"], np.zeros(len(Z["val"])), metric).reason
            notes[f"C[{metric}]"] = f"validation AUC is undefined ({reason}); C={chosen} used without selection"
        if capped[chosen]:
            notes[f"convergence[{metric}]"] = f"reached max_iter={probe.max_iter} at C={chosen}"
        return path[chosen].scores(Z["test"])[:, 0], chosen
