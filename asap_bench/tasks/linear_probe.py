"""Linear-probe classification on frozen global features (the ``cls`` family, and ``ext`` on top of it).

The probe is a logistic regression: one independent binary model per label for
multi-label sets (one-vs-rest), one multinomial model for multi-class sets, one
binary model otherwise. Features are standardised with statistics of the regime's
training subset only; the regularisation strength C is chosen on validation by the
protocol's primary metric; test is scored once, with the chosen model.

Decisions for accuracy-type metrics: a multi-class case gets its most probable
class; a binary label gets a threshold chosen on validation (Youden's J on the val
ROC curve, 0.5 where val cannot define one), so balanced accuracy is not punished
by class imbalance and never looks at test. Thresholds travel with the per-case
outputs, so every metric can be recomputed from a record's units.

External validation fits and selects exactly as on the source and then scores
the unchanged model (scaler, weights, thresholds) on every case of the target.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.preprocessing import StandardScaler

from ..data.cards import LabelSet
from ..data.manifest import Manifest, label_matrix
from ..metrics.classification import Metric, SUPPORTED, score_outputs
from ..protocol import Protocol
from .base import FeatureLookup, TaskFamily, TaskInputs, TaskResult
from .selection import choose, default_value

# Head parameters the probe reads, and ones that belong to other stages of a cls protocol.
PROBE_PARAMS = {"standardize", "C_grid", "select_on", "max_iter", "tol", "class_weight", "multi_label", "multi_class"}
OTHER_STAGE_PARAMS = {"patch_voxels"}  # read by the data pipeline (candidate-patch cutting), not the probe
DEFAULT_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class ProbeParams:
    """The head parameters of a cls protocol, checked against the label set they will fit."""

    c_grid: tuple[float, ...]
    standardize: bool = True
    max_iter: int = 1000
    tol: float = 1e-4
    class_weight: Any = None

    @classmethod
    def from_protocol(cls, protocol: Protocol, spec: LabelSet) -> "ProbeParams":
        head = protocol.head
        if head.kind != "logistic_regression":
            raise ValueError(f"{protocol.id}: the linear probe fits head kind 'logistic_regression', not {head.kind!r}")
        params = dict(head.params)
        unknown = sorted(set(params) - PROBE_PARAMS - OTHER_STAGE_PARAMS)
        if unknown:
            raise ValueError(f"{protocol.id}: unknown head param(s) {unknown}; the probe reads {sorted(PROBE_PARAMS)}")
        if params.get("select_on", "val") != "val":
            raise ValueError(f"{protocol.id}: select_on must be 'val' (C is never chosen on test)")
        if "multi_label" in params:
            if params["multi_label"] != "one_vs_rest":
                raise ValueError(f"{protocol.id}: multi_label must be 'one_vs_rest', got {params['multi_label']!r}")
            if spec.kind != "multilabel":
                raise ValueError(f"{protocol.id}: multi_label is set but the label set is {spec.kind}")
        if "multi_class" in params:
            if params["multi_class"] != "multinomial":
                raise ValueError(f"{protocol.id}: multi_class must be 'multinomial', got {params['multi_class']!r}")
            if spec.kind != "multiclass":
                raise ValueError(f"{protocol.id}: multi_class is set but the label set is {spec.kind}")
        grid = tuple(sorted({float(c) for c in params.get("C_grid", DEFAULT_C_GRID)}))
        if not grid or any(not (c > 0 and math.isfinite(c)) for c in grid):
            raise ValueError(f"{protocol.id}: C_grid must list positive numbers, got {params.get('C_grid')!r}")
        weight = params.get("class_weight")
        if weight is not None and weight != "balanced" and not isinstance(weight, dict):
            raise ValueError(f"{protocol.id}: class_weight must be 'balanced' or a mapping, got {weight!r}")
        if isinstance(weight, dict):
            weight = {int(k): float(v) for k, v in weight.items()}
        return cls(c_grid=grid, standardize=bool(params.get("standardize", True)),
                   max_iter=int(params.get("max_iter", 1000)), tol=float(params.get("tol", 1e-4)),
                   class_weight=weight)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

def feature_matrix(lookup: FeatureLookup, ids: list[str], what: str) -> np.ndarray:
    X = np.asarray(lookup.global_features(list(ids)), dtype=np.float64)
    if X.ndim != 2 or len(X) != len(ids):
        raise ValueError(f"{what}: expected [{len(ids)}, D] global features, got shape {X.shape}")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        shown = [ids[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(f"{what}: {int(bad.sum())} case(s) have non-finite features, e.g. {shown}")
    return X


def _labels(manifest: Manifest, target: str, ids: list[str]) -> np.ndarray:
    """[cases, columns] float labels, NaN where unlabelled."""
    return label_matrix(manifest, target).loc[list(ids)].to_numpy(dtype=float)


def _output_names(spec: LabelSet) -> list[str]:
    return list(spec.classes) if spec.kind == "multiclass" else list(spec.columns)


# ---------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------

@dataclass
class Probe:
    """One fitted model per output head: per label (binary, multi-label) or one for all classes."""

    kind: str
    n_outputs: int
    models: list[LogisticRegression | None]  # None: a head that could not be fitted

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Probabilities [cases, outputs]; NaN for heads that were not fitted."""
        out = np.full((len(X), self.n_outputs), np.nan)
        if self.kind == "multiclass":
            model = self.models[0]
            if model is not None:
                out[:] = 0.0
                out[:, model.classes_.astype(int)] = model.predict_proba(X)
            return out
        for j, model in enumerate(self.models):
            if model is not None:
                out[:, j] = model.predict_proba(X)[:, 1]
        return out


def _heads(kind: str, Y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row mask, target) per model; rows whose label is missing are dropped per label."""
    if kind == "multiclass":
        keep = ~np.isnan(Y[:, 0])
        return [(keep, Y[keep, 0].astype(int))]
    return [(~np.isnan(Y[:, j]), Y[~np.isnan(Y[:, j]), j].astype(int)) for j in range(Y.shape[1])]


def fit_path(X: np.ndarray, Y: np.ndarray, kind: str, n_outputs: int, params: ProbeParams,
             seed: int) -> tuple[dict[float, Probe], dict[float, list[int]], dict[int, str]]:
    """Fit every C of the grid, warm-starting each fit from the previous (smaller) C.

    Returns the probe per C, the heads that hit max_iter per C, and heads that could
    not be fitted (one class in the training subset) with the reason.
    """
    path: dict[float, list] = {c: [] for c in params.c_grid}
    capped: dict[float, list[int]] = {c: [] for c in params.c_grid}
    unfitted: dict[int, str] = {}
    for h, (keep, y) in enumerate(_heads(kind, Y)):
        classes = np.unique(y)
        if len(classes) < 2:
            unfitted[h] = ("the training subset has no labelled case" if len(classes) == 0 else
                           f"the training subset has only class {int(classes[0])} ({len(y)} case(s))")
            for c in params.c_grid:
                path[c].append(None)
            continue
        model = LogisticRegression(C=params.c_grid[0], max_iter=params.max_iter, tol=params.tol,
                                   class_weight=params.class_weight, random_state=seed, warm_start=True)
        Xh = X[keep]
        for c in params.c_grid:
            model.set_params(C=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(Xh, y)
            if int(np.max(model.n_iter_)) >= params.max_iter:
                capped[c].append(h)
            path[c].append(copy.deepcopy(model))
    return {c: Probe(kind, n_outputs, models) for c, models in path.items()}, capped, unfitted


def youden_thresholds(Y: np.ndarray, S: np.ndarray) -> tuple[list[float], dict[int, str]]:
    """Per label, a threshold maximising TPR - FPR (Youden's J) on these validation outputs; 0.5 where undefined."""
    thresholds, fallback = [], {}
    for j in range(Y.shape[1]):
        keep = ~np.isnan(Y[:, j]) & ~np.isnan(S[:, j])
        y, s = Y[keep, j], S[keep, j]
        if len(np.unique(y)) < 2:
            thresholds.append(0.5)
            fallback[j] = "validation holds one class or none; threshold 0.5"
            continue
        fpr, tpr, cut = roc_curve(y, s, drop_intermediate=False)
        best = int(np.argmax(tpr - fpr))
        # halfway to the next lower val score: the same val decisions, with a margin on both sides
        t = (cut[best] + cut[best + 1]) / 2 if 0 < best < len(cut) - 1 else cut[best]
        thresholds.append(float(min(t, 1.0)))
    return thresholds, fallback


def _metric_value(metric: Metric) -> float | None:
    return metric.value if metric.defined else None


def _jsonable(array: np.ndarray) -> list:
    return [[None if math.isnan(v) else float(v) for v in row] for row in np.asarray(array, dtype=float)]


def _target_columns(source: LabelSet, target: LabelSet, notes: dict[str, str]) -> list[str]:
    """The target's label columns in the order of the source model's outputs."""
    if source.kind != target.kind or source.n_outputs != target.n_outputs:
        raise ValueError(f"the target label set ({target.kind}, {target.n_outputs} outputs) does not match the "
                         f"source's ({source.kind}, {source.n_outputs} outputs); a cls model cannot transfer")
    if set(target.columns) == set(source.columns):
        return list(source.columns)
    notes["label_map"] = (f"target columns {target.columns} matched to source columns {source.columns} by position")
    return list(target.columns)


def _source_protocol(protocol: Protocol, notes: dict[str, str]) -> Protocol:
    """The ext protocol's source, whose primary metric and metrics the selection and source scores use."""
    from ..protocol import get_protocol

    try:
        return get_protocol(protocol.transfer.source)
    except KeyError:
        notes["source_protocol"] = (f"{protocol.transfer.source} is not a shipped protocol; "
                                    f"C selected by this protocol's primary metric {protocol.primary_metric!r}")
        return protocol


class LinearProbe(TaskFamily):
    """Logistic regression on frozen global features, C chosen on validation, test scored once."""

    name = "cls"
    needs = "global"

    def run(self, inputs: TaskInputs) -> TaskResult:
        protocol = inputs.protocol
        if inputs.features is None:
            raise ValueError(f"{protocol.id}: the linear probe needs frozen global features")
        target_name = protocol.data.target
        if target_name is None:
            raise ValueError(f"{protocol.id}: a cls protocol names a label set in data.target")
        spec = inputs.manifest.table.labels[target_name]
        params = ProbeParams.from_protocol(protocol, spec)
        names = _output_names(spec)
        notes: dict[str, str] = {}
        external = protocol.family == "ext"

        selection_protocol = _source_protocol(protocol, notes) if external else protocol
        primary = selection_protocol.primary_metric
        source_metrics = list(selection_protocol.metrics) if external else list(protocol.metrics)
        for metric in {primary, *protocol.metrics, *source_metrics}:
            if metric not in SUPPORTED:
                raise ValueError(f"{protocol.id}: the linear probe reports {list(SUPPORTED)}, not {metric!r}")

        if external and (inputs.target is None or inputs.target_features is None):
            reason = "target data or its features are unavailable; nothing was fitted"
            return TaskResult(metrics={m: None for m in protocol.metrics},
                              notes={m: reason for m in protocol.metrics} | {"target": reason})

        split = inputs.split
        train_ids, val_ids, test_ids = list(inputs.train), list(split.val), list(split.test)
        if not train_ids:
            raise ValueError(f"{protocol.id}: the regime {inputs.ratio} subset of train is empty")
        X_train = feature_matrix(inputs.features, train_ids, "train")
        X_val = feature_matrix(inputs.features, val_ids, "val") if val_ids else np.empty((0, X_train.shape[1]))
        Y_train = _labels(inputs.manifest, target_name, train_ids)
        Y_val = _labels(inputs.manifest, target_name, val_ids)

        scaler = StandardScaler(with_mean=params.standardize, with_std=params.standardize).fit(X_train)
        Z_train, Z_val = scaler.transform(X_train), scaler.transform(X_val)

        path, capped, unfitted = fit_path(Z_train, Y_train, spec.kind, spec.n_outputs, params, inputs.seed)
        for h, reason in unfitted.items():
            head = "model" if spec.kind == "multiclass" else names[h]
            notes[f"unfitted[{head}]"] = f"{reason}; its scores are missing (NaN)"

        # select C on validation by the primary metric; ties go to the stronger regularisation
        curve: dict[float, float] = {}
        for c, probe in path.items():
            S_val = probe.scores(Z_val)
            needs_cut = spec.kind != "multiclass" and primary != "auc"
            thresholds = youden_thresholds(Y_val, S_val)[0] if needs_cut else None
            metric = score_outputs(spec.kind, Y_val, S_val, [primary], names, thresholds)[primary]
            curve[c] = metric.value
        chosen = choose(curve, prefer_larger=False)
        if chosen is None:
            chosen = default_value(params.c_grid)
            notes["C"] = (f"validation {primary} is undefined for every C ({len(val_ids)} val case(s)); "
                          f"C={chosen} used without selection")
        probe = path[chosen]
        if capped[chosen]:
            heads = ["model"] if spec.kind == "multiclass" else [names[h] for h in capped[chosen]]
            notes["convergence"] = f"reached max_iter={params.max_iter} at C={chosen} for {heads}"

        S_val = probe.scores(Z_val)
        thresholds: list[float] | None = None
        if spec.kind != "multiclass":
            thresholds, fallback = youden_thresholds(Y_val, S_val)
            if fallback:
                notes["thresholds"] = "; ".join(f"{names[j]}: {r}" for j, r in fallback.items())

        def score_cases(manifest: Manifest, label_set: str, columns: list[str] | None, lookup: FeatureLookup,
                        ids: list[str], metrics: list[str], what: str) -> tuple[dict[str, Metric], dict[str, Any]]:
            if ids:
                S = probe.scores(scaler.transform(feature_matrix(lookup, ids, what)))
            else:
                S = np.empty((0, spec.n_outputs))
            frame = label_matrix(manifest, label_set)
            Y = (frame[columns] if columns else frame).loc[ids].to_numpy(dtype=float)
            result = score_outputs(spec.kind, Y, S, metrics, names, thresholds)
            auc = result.get("auc") or score_outputs(spec.kind, Y, S, ["auc"], names)["auc"]
            units = {
                "kind": "case", "task": spec.kind, "ids": list(ids),
                "label_names": list(spec.columns) if columns is None else list(columns),
                "score_names": list(names),
                "labels": _jsonable(Y), "scores": _jsonable(S),
                "thresholds": thresholds,
                "per_label": {n: (None if math.isnan(v) else v) for n, v in auc.per_label.items()},
            }
            return result, units

        sizes = {"train": len(train_ids), "val": len(val_ids), "test": len(test_ids), "dim": int(X_train.shape[1])}
        source_result, source_units = score_cases(inputs.manifest, target_name, None, inputs.features,
                                                  test_ids, source_metrics, "test")
        if external:
            ref = protocol.transfer.target
            target_spec = inputs.target.table.labels[ref.target]
            columns = _target_columns(spec, target_spec, notes)
            frame = inputs.target.frame
            keep = pd.Series(True, index=frame.index)
            for column, value in (ref.where or {}).items():
                keep &= pd.to_numeric(frame[column], errors="coerce").eq(value)
            keep &= label_matrix(inputs.target, ref.target).notna().any(axis=1)
            target_ids = sorted(frame.index[keep])
            result, units = score_cases(inputs.target, ref.target, columns, inputs.target_features,
                                        target_ids, list(protocol.metrics), "target")
            units["source"] = {
                "metrics": {f"source_{m}": _metric_value(v) for m, v in source_result.items()},
                "notes": {f"source_{m}": v.reason for m, v in source_result.items() if v.reason},
                "per_label": source_units["per_label"],
                "n_test": len(test_ids),
            }
            sizes["target"] = len(target_ids)
        else:
            result, units = source_result, source_units
        units["val_curve"] = {repr(c): (None if math.isnan(v) else v) for c, v in curve.items()}

        for metric, value in result.items():
            if value.reason:
                notes[metric] = value.reason
        return TaskResult(
            metrics={m: _metric_value(result[m]) for m in protocol.metrics},
            notes=notes,
            selected={"C": chosen},
            sizes=sizes,
            units=units,
        )
