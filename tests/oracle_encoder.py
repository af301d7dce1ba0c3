"""A test-only ``oracle`` encoder: features made of what the demo generator drew, so a wired family must rank it first.

The encoder interface only receives the preprocessed volume tensor, so the oracle
recognises a volume by the sha256 of that exact tensor (the float16 array
``VolumeCache.get`` returns for the protocol's InputSpec, which is what the runner
feeds). ``install`` builds that lookup from a prepared demo cohort and refuses any
other data root; ``encode`` refuses a tensor it was not built for. Nothing here is
shipped or registered outside the tests.

What a volume's truth is, read from the prepared files (never from intensities):

* global embedding [64]: one slot per label column of the dataset cards (the 18
  CT-RATE abnormalities shared by CT-RATE, RAD-ChestCT and AHPH; COVID-19, severe
  outcome, nodule candidate, PE, the three mortality horizons; the CC-CCII
  diagnosis one-hot), a survival-risk slot from the drawn event time, the lesion
  burden (number of positive findings), and a random projection of the report's
  words; plus Gaussian noise;
* patch tokens [64 tokens on the 4x4x4 grid, 128]: the label slots on every token,
  and per token either the projection of one report sentence (token k: sentence k
  of the findings, then of the impression) or, for a volume with a mask, the
  fraction of each structure in that patch (the mask run through the same
  preprocessing); plus noise;
* hidden states: the tokens, once per block of the card's depth.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from asap_bench.data.cache import VolumeCache, unique_images
from asap_bench.data.cards import dataset_names, load_card
from asap_bench.data.demo import is_demo_root
from asap_bench.data.manifest import load_manifest
from asap_bench.data.transforms import build_preprocessing
from asap_bench.encoders.base import Encoder, EncoderOutput, token_grid
from asap_bench.encoders.card import EncoderCard, load_encoder_card
from asap_bench.encoders.registry import forget_card, register_card
from asap_bench.protocol import Protocol

NAME = "oracle"
GLOBAL_DIM = 64  # not above prog's pca_components (64): the Cox head sees every slot
TOKEN_DIM = 128
GLOBAL_NOISE = 0.2
TOKEN_NOISE = 0.05


def card() -> EncoderCard:
    """The random-init card's input and grid (so both encoders read the same cached volumes), as an oracle."""
    raw = load_encoder_card("random").model_dump(mode="json")
    raw.update(name=NAME, title="Oracle (test only): features from the demo generator's answers",
               table_label="Oracle", family="oracle", order=99, description="Test-only; see tests/oracle_encoder.py.",
               embed_dim=GLOBAL_DIM, outputs=["global", "patch_tokens", "hidden_states"],
               segmentation={"mode": "not_applicable",
                             "reason": "test-only oracle; segmentation's floor is UNETR training itself"},
               status={"level": "not_rebuilt", "why": "a test fixture, not a published encoder"},
               citation="test fixture", notes=[])
    raw["architecture"] = {**raw["architecture"], "embed_dim": GLOBAL_DIM}
    raw["sizes"] = {"demo": {**raw["sizes"]["demo"], "embed_dim": GLOBAL_DIM}}
    return EncoderCard.model_validate(raw)


# --------------------------------------------------------------------------- truth from the prepared files

def _slots() -> list[str]:
    """Global slot names: every label column (a multiclass column once per class), then survival and burden."""
    names: list[str] = []
    for dataset in dataset_names():
        for table in load_card(dataset).tables.values():
            for labels in table.labels.values():
                if labels.kind == "multiclass":
                    names += [f"{labels.columns[0]}={k}" for k in range(len(labels.classes))]
                else:
                    names += labels.columns
            if table.survival is not None:
                names += list(table.survival.horizons)
    return list(dict.fromkeys(names)) + ["risk", "burden"]


SLOTS = _slots()
WORD_DIMS = GLOBAL_DIM - len(SLOTS)
LOCAL_DIMS = TOKEN_DIM - len(SLOTS)
assert WORD_DIMS >= 16, SLOTS


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _words(text: str, dims: int) -> np.ndarray:
    """A fixed random projection of the text's word counts (each word its own Gaussian direction), unit norm."""
    out = np.zeros(dims)
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        out += _rng("word", word, dims).standard_normal(dims)
    norm = np.linalg.norm(out)
    return out / norm if norm else out


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


@dataclass
class Case:
    """What the files say about one image file, gathered over every table row that points at it."""

    values: dict[str, float]
    texts: dict[str, str]
    mask: tuple[Path, Path] | None = None  # (image, mask) files


def _label_values(row: pd.Series, table) -> dict[str, float]:
    values: dict[str, float] = {}
    for labels in table.labels.values():
        for column in labels.columns:
            v = row.get(column)
            if v is None or pd.isna(v):
                continue
            if labels.kind == "multiclass":
                values[f"{column}={int(v)}"] = 1.0
            else:
                values[column] = float(v)
    if table.survival is not None:
        for column in table.survival.horizons:
            v = row.get(column)
            values[column] = 0.0 if v is None or pd.isna(v) else float(v)
        values["risk"] = 1.0 - float(row[table.survival.time]) / 700.0  # earlier event or censoring: higher
    findings = [c for labels in table.labels.values() if labels.kind != "multiclass" for c in labels.columns
                if row.get(c) == 1]
    values["burden"] = len(findings) / 4.0
    return values


def gather(root: Path) -> dict[Path, Case]:
    """Every image file of the cohort with its labels, survival, report text and mask."""
    cases: dict[Path, Case] = {}
    for dataset in dataset_names():
        for name, table in load_card(dataset).tables.items():
            csv = root / dataset / f"{name}.csv"
            if not csv.is_file():
                continue
            frame = pd.read_csv(csv)
            for _, row in frame.iterrows():
                image = (root / dataset / row["image"]).resolve()
                case = cases.setdefault(image, Case({}, {}))
                case.values.update(_label_values(row, table))
                case.texts.update({c: str(row[c]) for c in table.text if isinstance(row.get(c), str)})
                if table.mask is not None:
                    case.mask = (image, (root / dataset / row["mask"]).resolve())
    return cases


# --------------------------------------------------------------------------- features

def _slot_vector(case: Case) -> np.ndarray:
    return np.array([case.values.get(s, 0.0) for s in SLOTS])


def global_vector(key: str, case: Case) -> np.ndarray:
    report = " ".join(case.texts.get(c, "") for c in ("findings", "impression"))
    clean = np.concatenate([_slot_vector(case), _words(report, WORD_DIMS)])
    return (clean + GLOBAL_NOISE * _rng("noise", key).standard_normal(GLOBAL_DIM)).astype(np.float32)


def _mask_fractions(case: Case, spec, grid: tuple[int, int, int], n_structures: int) -> np.ndarray:
    """[tokens, n_structures]: the share of each structure's voxels in each patch, in the encoder's frame."""
    image, mask = case.mask
    out = build_preprocessing(spec, with_mask=True)({"image": str(image), "mask": str(mask)})
    labels = torch.as_tensor(np.asarray(out["mask"]))[0].long()
    onehot = torch.nn.functional.one_hot(labels, n_structures + 1).permute(3, 0, 1, 2).float()[1:]
    pooled = torch.nn.functional.adaptive_avg_pool3d(onehot[None], grid)[0]
    return pooled.flatten(1).T.numpy()


def token_matrix(key: str, case: Case, spec, grid: tuple[int, int, int]) -> np.ndarray:
    n = math.prod(grid)
    local = np.zeros((n, LOCAL_DIMS))
    sentences = [s for c in ("findings", "impression") for s in _sentences(case.texts.get(c, ""))]
    for k, sentence in enumerate(sentences[:n]):
        local[k] = _words(sentence, LOCAL_DIMS)
    if case.mask is not None:
        fractions = _mask_fractions(case, spec, grid, min(LOCAL_DIMS, 16))
        local[:, :fractions.shape[1]] = fractions
    clean = np.concatenate([np.repeat(_slot_vector(case)[None], n, axis=0), local], axis=1)
    return (clean + TOKEN_NOISE * _rng("token-noise", key).standard_normal(clean.shape)).astype(np.float32)


def tensor_key(volume: np.ndarray | torch.Tensor) -> str:
    """The identity of a preprocessed volume: sha256 of its float16 bytes (how the volume cache stores it)."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(volume, dtype=np.float16).tobytes()).hexdigest()


class Lookup:
    """tensor key -> (global [64], tokens [N, 128]) of the volumes an ``install`` was built for."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.image_of: dict[str, Path] = {}

    def find(self, volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        key = tensor_key(volume)
        if key not in self.rows:
            raise LookupError(f"oracle encoder: input volume {key[:12]} is not a preprocessed volume of the synthetic "
                              "demo cohort it was installed for; the oracle only encodes that cohort "
                              "(tests/oracle_encoder.install)")
        return self.rows[key]


LOOKUP = Lookup()


def install(root: Path, protocols: list[Protocol], cache_dir: Path) -> EncoderCard:
    """Register the oracle for this process and teach it every volume ``protocols`` will feed it from ``root``.

    Preprocesses those volumes into ``cache_dir`` (where the runner then finds them). Refuses a data root
    that is not the synthetic demo cohort.
    """
    from asap_bench.runner.local import effective_input

    if not is_demo_root(root):
        raise ValueError(f"oracle encoder: {root} is not the synthetic demo cohort (no demo.json marking it "
                         "synthetic); the oracle reads the generator's answers and runs on the demo only")
    oracle = card()
    register_card(oracle, OracleEncoder)
    cases = gather(Path(root))
    grid = tuple(token_grid(oracle.architecture_for("demo")))
    for protocol in protocols:
        spec = effective_input(protocol, oracle, "demo").spec
        refs = [protocol.data] + ([protocol.transfer.target] if protocol.transfer is not None else [])
        for ref in refs:
            manifest = load_manifest(root, ref.dataset, ref.table)
            volumes = VolumeCache(manifest, spec, cache_dir)
            for image in unique_images(manifest):
                path = (manifest.folder / image).resolve()
                key = tensor_key(volumes.get(image))
                seen = LOOKUP.image_of.get(key)
                if seen is not None and seen != path and cases[seen] != cases[path]:
                    raise ValueError(f"oracle encoder: {path} and {seen} preprocess to the same tensor but their "
                                     "truths differ; the oracle cannot tell them apart")
                if key not in LOOKUP.rows:
                    name = str(path.relative_to(Path(root).resolve()))
                    LOOKUP.rows[key] = (global_vector(name, cases[path]), token_matrix(name, cases[path], spec, grid))
                    LOOKUP.image_of[key] = path
    return oracle


def uninstall() -> None:
    forget_card(NAME)
    LOOKUP.rows.clear()
    LOOKUP.image_of.clear()


class OracleEncoder(Encoder):
    """Looks each input volume up; holds one frozen parameter only so that it has a device."""

    family = "oracle"

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        self.grid = tuple(token_grid(self.arch))
        self.depth = int(self.arch["depth"])
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        found = [LOOKUP.find(volume) for volume in x]
        g = torch.from_numpy(np.stack([f[0] for f in found])).to(x.device) + self.anchor
        tokens = torch.from_numpy(np.stack([f[1] for f in found])).to(x.device) + self.anchor
        states = [tokens] * self.depth if hidden_states else None
        return EncoderOutput(g, tokens, self.grid, states)


