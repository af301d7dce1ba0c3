"""Patient-grouped train / val / test splits and nested, seeded label regimes.

One mechanism does all the subsetting: patients are put in a *stratified
order* (each stratum spread evenly along the order, shuffled within), and a
subset is a prefix of that order holding the wanted share of cases. Prefixes
of one order are nested by construction, so for a seed the 1 % subset lies
inside the 10 % one, which lies inside 100 %. Test and validation are fixed
per protocol (drawn with the protocol's split seed); the run seed only changes
the regime order, so every seed and every encoder is scored on the same cases.
Validation is carved from training, never from test, and no patient is ever in
two parts. Splits are written as JSON files with a content hash and reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import files
from .data.manifest import Manifest, label_matrix
from .protocol import Protocol
from .schema import content_hash

FORMAT_VERSION = 1


class SplitError(ValueError):
    """A split that cannot be made, or a split file that cannot be trusted."""


@dataclass(frozen=True)
class Split:
    """The cases of one protocol and seed: train / val / test and the regime subsets of train."""

    protocol: str
    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    regimes: dict[str, list[str]]  # ratio as a string ("0.01") -> case ids, nested
    excluded: list[str]  # rows dropped before splitting (filtered out, or no label)
    key: str  # hash of everything the split was made from
    sha256: str  # hash of the split's content, recorded in every result

    def regime(self, ratio: float) -> list[str]:
        name = ratio_name(ratio)
        if name not in self.regimes:
            raise KeyError(f"regime {name} not in split of {self.protocol} (has {sorted(self.regimes)})")
        return self.regimes[name]

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, **self.__dict__}


def ratio_name(ratio: float) -> str:
    return repr(float(ratio))


def _seed_sequence(*parts: object) -> np.random.Generator:
    """A generator seeded from text parts, so streams for (protocol, seed, purpose) never collide."""
    digest = content_hash([str(p) for p in parts])
    return np.random.default_rng(int(digest[:16], 16))


# ---------------------------------------------------------------------------
# strata and coverage units: what "stratified" and "one positive per label" mean
# ---------------------------------------------------------------------------

def case_units(manifest: Manifest, protocol: Protocol) -> pd.DataFrame:
    """Boolean case x unit table: the label values a regime subset must contain if the pool does.

    Multi-label: one unit per label (its positives). Binary and multi-class: one unit
    per class, so a subset never lacks a class. Survival: the observed events.
    """
    frame = manifest.frame
    target = protocol.data.target
    if target is not None:
        spec = manifest.table.labels[target]
        values = label_matrix(manifest, target)
        if spec.kind == "multilabel":
            return values.eq(1)
        column = values[spec.columns[0]]
        classes = range(spec.n_outputs) if spec.kind == "multiclass" else (0, 1)
        return pd.DataFrame({f"{spec.columns[0]}={k}": column.eq(k) for k in classes}, index=frame.index)
    survival = manifest.table.survival
    if survival is not None:
        return pd.DataFrame({"event": pd.to_numeric(frame[survival.event]).eq(1)}, index=frame.index)
    return pd.DataFrame(index=frame.index)


def case_strata(units: pd.DataFrame) -> pd.Series:
    """Each case's stratum: its rarest unit (by pool frequency), or 'none'."""
    if units.shape[1] == 0:
        return pd.Series("all", index=units.index)
    rarity = units.sum().sort_values(kind="stable")  # rarest first
    ordered = units[rarity.index]
    first = ordered.to_numpy().argmax(axis=1)
    has_any = ordered.to_numpy().any(axis=1)
    names = np.where(has_any, np.asarray(rarity.index)[first], "none")
    return pd.Series(names, index=units.index)


def patient_strata(patients: pd.Series, strata: pd.Series) -> pd.Series:
    """A patient's stratum is the rarest stratum among its cases."""
    frequency = strata.value_counts()
    rank = strata.map(frequency)
    chosen = rank.groupby(patients).idxmin()
    return strata.loc[chosen.values].set_axis(chosen.index)


def stratified_order(strata: pd.Series, rng: np.random.Generator, stratify: bool = True) -> list[str]:
    """Patients in an order where every prefix holds each stratum in proportion.

    Within a stratum patients are shuffled; the i-th of n gets position (i + u) / n
    with one random offset u per stratum, and patients are sorted by position.
    """
    ids = np.asarray(strata.index)
    if not stratify:
        return list(ids[rng.permutation(len(ids))])
    positions = np.empty(len(ids))
    for name in sorted(strata.unique()):
        members = np.flatnonzero(strata.to_numpy() == name)
        members = members[rng.permutation(len(members))]
        positions[members] = (np.arange(len(members)) + rng.random()) / len(members)
    tie = rng.random(len(ids))
    return list(ids[np.lexsort((tie, positions))])


def take_prefix(order: list[str], sizes: pd.Series, fraction: float, minimum: int = 1) -> list[str]:
    """The shortest prefix of patients whose cases reach ``fraction`` of all cases."""
    target = max(1, round(fraction * int(sizes.loc[order].sum())))
    cumulative = np.cumsum(sizes.loc[order].to_numpy())
    count = int(np.searchsorted(cumulative, target) + 1)
    return order[: max(count, minimum)]


def coverage_first(order: list[str], patient_units: pd.DataFrame, rng: np.random.Generator) -> list[str]:
    """Move to the front one random patient per unit not yet covered (rarest units first)."""
    chosen: list[str] = []
    covered = pd.Series(False, index=patient_units.columns)
    for unit in patient_units.sum().sort_values(kind="stable").index:
        holders = patient_units.index[patient_units[unit].to_numpy()]
        if covered[unit] or len(holders) == 0:
            continue
        pick = holders[rng.integers(len(holders))]
        chosen.append(pick)
        covered |= patient_units.loc[pick]
    picked = set(chosen)
    return chosen + [p for p in order if p not in picked]


# ---------------------------------------------------------------------------
# making a split
# ---------------------------------------------------------------------------

def split_key(manifest: Manifest, protocol: Protocol, seed: int) -> str:
    """Everything a split depends on; a split file made from other inputs is never reused."""
    return content_hash({
        "format_version": FORMAT_VERSION,
        "manifest_sha256": manifest.sha256,
        "data": protocol.data.model_dump(mode="json"),
        "split": protocol.split.model_dump(mode="json"),
        "regimes": [ratio_name(r) for r in protocol.regimes],
        "seed": seed,
    })


def _eligible(manifest: Manifest, protocol: Protocol) -> tuple[pd.DataFrame, list[str]]:
    frame = manifest.frame
    keep = pd.Series(True, index=frame.index)
    for column, value in (protocol.data.where or {}).items():
        keep &= pd.to_numeric(frame[column], errors="coerce").eq(value)
    if protocol.data.target is not None:
        keep &= label_matrix(manifest, protocol.data.target).notna().any(axis=1)
    return frame[keep], sorted(frame.index[~keep])


def make_split(manifest: Manifest, protocol: Protocol, seed: int) -> Split:
    """Make the split of ``protocol`` on ``manifest`` for run ``seed`` (deterministic)."""
    rule, owner = protocol.split, protocol.split_owner
    frame, excluded = _eligible(manifest, protocol)
    if frame.empty:
        raise SplitError(f"{manifest.path}: no case of {protocol.id} is left after filtering; nothing to split")
    patients = frame["patient_id"].astype(str)
    sizes = patients.value_counts()
    units = case_units(manifest, protocol).loc[frame.index]
    strata = patient_strata(patients, case_strata(units))

    def cases_of(chosen: list[str] | set[str]) -> list[str]:
        return sorted(frame.index[patients.isin(set(chosen))])

    if rule.source == "none":
        train_p: list[str] = []
        val_p: list[str] = []
        test_p = list(sizes.index)
    elif rule.source == "official":
        official = frame["split"]
        parts = official.groupby(patients).nunique()
        if (parts > 1).any():
            bad = sorted(parts.index[parts > 1])[:5]
            raise SplitError(f"{manifest.path}: the official split puts patient(s) {bad} in more than one part")
        test_p = sorted(set(patients[official == "test"]))
        val_p = sorted(set(patients[official == "val"]))
        train_p = sorted(set(patients[official == "train"]))
        if not test_p:
            raise SplitError(f"{manifest.path}: the official split has no test rows (column 'split' == 'test')")
        if not val_p:
            order = stratified_order(strata.loc[train_p], _seed_sequence(owner, rule.seed, "val"), rule.stratify)
            val_p = take_prefix(order, sizes, rule.val_fraction)
            train_p = [p for p in train_p if p not in set(val_p)]
    else:
        order = stratified_order(strata, _seed_sequence(owner, rule.seed, "test"), rule.stratify)
        test_p = take_prefix(order, sizes, rule.test_fraction)
        pool = [p for p in order if p not in set(test_p)]
        order = stratified_order(strata.loc[pool], _seed_sequence(owner, rule.seed, "val"), rule.stratify)
        val_p = take_prefix(order, sizes, rule.val_fraction)
        train_p = [p for p in pool if p not in set(val_p)]

    regimes: dict[str, list[str]] = {}
    if rule.source != "none":
        if not train_p:
            raise SplitError(f"{manifest.path}: {protocol.id} has no training patient left after carving validation")
        rng = _seed_sequence(owner, rule.seed, "regimes", seed)
        order = stratified_order(strata.loc[train_p], rng, rule.stratify)
        patient_units = units.groupby(patients).any().loc[train_p]
        order = coverage_first(order, patient_units, rng)
        minimum = _coverage_size(order, patient_units)
        for ratio in protocol.regimes:
            chosen = order if ratio >= 1 else take_prefix(order, sizes, ratio, minimum)
            regimes[ratio_name(ratio)] = cases_of(chosen)

    body = {
        "protocol": owner,
        "seed": seed,
        "train": cases_of(train_p),
        "val": cases_of(val_p),
        "test": cases_of(test_p),
        "regimes": regimes,
        "excluded": excluded,
        "key": split_key(manifest, protocol, seed),
    }
    return Split(**body, sha256=content_hash(body))


def _coverage_size(order: list[str], patient_units: pd.DataFrame) -> int:
    """How many leading patients it takes to cover every unit the pool has."""
    needed = patient_units.any(axis=0)
    seen = pd.Series(False, index=patient_units.columns)
    for count, patient in enumerate(order, start=1):
        seen |= patient_units.loc[patient]
        if bool((seen | ~needed).all()):
            return count
    return len(order)


# ---------------------------------------------------------------------------
# split files
# ---------------------------------------------------------------------------

def split_path(directory: Path, protocol: Protocol, seed: int) -> Path:
    """Ext protocols share their source's files: the model they transfer was fit on that split."""
    return Path(directory) / protocol.split_owner.replace("/", "__") / f"seed{seed}.json"


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temp file and a rename, so a reader never sees half a file."""
    files.write_atomic(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")


def read_split(path: Path) -> Split:
    """Load a split file and check its content hash (a hand-edited file is refused)."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SplitError(f"{path}: not a readable split file ({err})") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise SplitError(f"{path}: split format_version {payload.get('format_version')!r}, expected {FORMAT_VERSION}")
    body = {k: payload.get(k) for k in ("protocol", "seed", "train", "val", "test", "regimes", "excluded", "key")}
    if content_hash(body) != payload.get("sha256"):
        raise SplitError(f"{path}: content does not match its sha256; the file was edited or damaged. "
                         "Delete it to make the split again")
    return Split(**body, sha256=payload["sha256"])


def ensure_split(manifest: Manifest, protocol: Protocol, seed: int, directory: Path, force: bool = False) -> Split:
    """Reuse the split file for (protocol, seed) when it was made from the same inputs; else make it.

    A file made from other inputs (another manifest, split rule or regime list) is
    not silently replaced: results already computed on it would lose their meaning.
    """
    path = split_path(directory, protocol, seed)
    if path.exists() and not force:
        split = read_split(path)
        expected = split_key(manifest, protocol, seed)
        if split.key != expected:
            raise SplitError(
                f"{path}: this split was made from other inputs (manifest, split rule or regimes changed). "
                "Pass --force to make it again, or use another splits directory"
            )
        return split
    split = make_split(manifest, protocol, seed)
    write_json_atomic(path, split.to_json())
    return split
