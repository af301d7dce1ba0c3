"""Drawing synthetic anatomy and lesions into numpy volumes (the demo cohort's images).

Everything is drawn in millimetres in patient coordinates (RAS+: x towards the
patient's right, y anterior, z superior; origin at the centre of the field of
view), so a different voxel spacing is a real change of appearance, as between
scanners. A ``Canvas`` holds two volumes: Hounsfield units (float) and a tissue
id per voxel (uint8). Segmentation masks are read from the tissue ids, so a
mask is exactly the voxels that were drawn. Shapes are painted only inside
their bounding box, which keeps a whole 64x64x32 phantom to a few milliseconds.

Each abnormality is one function in ``FINDINGS`` that draws a distinct pattern
and returns a record (where, how large) from which reports and VQA answers are
written, so every label and every sentence has signal in the image behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import IntEnum
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import ndimage

Vec = tuple[float, float, float]


class T(IntEnum):
    """Tissue ids stored per voxel; masks map a few of them to label values."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BONE = 3
    LUNG_R = 4
    LUNG_L = 5
    MED_FAT = 6
    HEART = 7
    BLOOD_POOL = 8
    AORTA = 9
    PULM_ARTERY = 10
    TRACHEA = 11
    BRONCHUS = 12
    ESOPHAGUS = 13
    AIRWAY_WALL = 14
    LIVER = 15
    SPLEEN = 16
    KIDNEY_R = 17
    KIDNEY_L = 18
    GALLBLADDER = 19
    STOMACH = 20
    PANCREAS = 21
    IVC = 22
    PORTAL_VEIN = 23
    ADRENAL_R = 24
    ADRENAL_L = 25
    LV = 26
    MYOCARDIUM = 27
    RV = 28
    METAL = 30
    CALCIUM = 31
    PERICARDIAL_FLUID = 32
    HERNIA = 33
    LYMPH_NODE = 34
    EMPHYSEMA = 35
    ATELECTASIS = 36
    NODULE = 37
    GGO = 38
    FIBROSIS = 39
    PLEURAL_FLUID = 40
    MOSAIC = 41
    CONSOLIDATION = 42
    SEPTAL = 43
    TUMOUR = 44
    EMBOLUS = 45
    INFECTION = 46
    VESSEL = 47


LUNGS = (T.LUNG_R, T.LUNG_L)
BLOOD = (T.BLOOD_POOL, T.AORTA, T.PULM_ARTERY, T.IVC, T.PORTAL_VEIN, T.VESSEL)
SOFT_BACKGROUND = (T.LUNG_R, T.LUNG_L, T.MED_FAT, T.FAT, T.MUSCLE)

# Non-contrast CT values; blood tissues take the contrast value when contrast is given.
HU = {
    T.AIR: -1000, T.FAT: -100, T.MUSCLE: 45, T.BONE: 650, T.LUNG_R: -860, T.LUNG_L: -860,
    T.MED_FAT: -90, T.HEART: 40, T.BLOOD_POOL: 40, T.AORTA: 40, T.PULM_ARTERY: 40,
    T.TRACHEA: -1000, T.BRONCHUS: -1000, T.ESOPHAGUS: 35, T.AIRWAY_WALL: 40, T.VESSEL: 40,
}


# --------------------------------------------------------------------------- shapes

class Shape:
    """A solid in millimetres: a bounding box and a vectorised inside test."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def centre(self) -> np.ndarray:
        lo, hi = self.bounds()
        return (lo + hi) / 2


@dataclass(frozen=True)
class Ellipsoid(Shape):
    c: Vec
    r: Vec

    def bounds(self):
        c, r = np.asarray(self.c, float), np.asarray(self.r, float)
        return c - r, c + r

    def inside(self, x, y, z):
        return (((x - self.c[0]) / self.r[0]) ** 2 + ((y - self.c[1]) / self.r[1]) ** 2
                + ((z - self.c[2]) / self.r[2]) ** 2) <= 1.0

    def centre(self):
        return np.asarray(self.c, float)

    def scaled(self, k: float | Vec) -> "Ellipsoid":
        k3 = (k, k, k) if isinstance(k, (int, float)) else k
        return Ellipsoid(self.c, tuple(r * s for r, s in zip(self.r, k3)))

    def grown(self, mm: float) -> "Ellipsoid":
        return Ellipsoid(self.c, tuple(r + mm for r in self.r))

    def point(self, u: float, v: float, w: float) -> Vec:
        """The point at relative position (u, v, w) in [-1, 1] of each semi-axis."""
        return (self.c[0] + u * self.r[0], self.c[1] + v * self.r[1], self.c[2] + w * self.r[2])


@dataclass(frozen=True)
class Cylinder(Shape):
    """An elliptic cylinder along z (body outline, vertebral column)."""

    cx: float
    cy: float
    rx: float
    ry: float
    z0: float = -math.inf
    z1: float = math.inf

    def bounds(self):
        return (np.array([self.cx - self.rx, self.cy - self.ry, self.z0]),
                np.array([self.cx + self.rx, self.cy + self.ry, self.z1]))

    def inside(self, x, y, z):
        inside = ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2 <= 1.0
        return inside & (z >= self.z0) & (z <= self.z1)

    def centre(self):
        z = 0.0 if math.isinf(self.z0) or math.isinf(self.z1) else (self.z0 + self.z1) / 2
        return np.array([self.cx, self.cy, z])


@dataclass(frozen=True)
class Tube(Shape):
    """A capsule around the segment p0-p1 (vessels, airways, streaks, wires)."""

    p0: Vec
    p1: Vec
    r: float

    def bounds(self):
        a, b = np.asarray(self.p0, float), np.asarray(self.p1, float)
        return np.minimum(a, b) - self.r, np.maximum(a, b) + self.r

    def inside(self, x, y, z):
        a, b = np.asarray(self.p0, float), np.asarray(self.p1, float)
        d = b - a
        length2 = float(d @ d) or 1e-9
        t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / length2, 0.0, 1.0)
        return ((x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2
                + (z - a[2] - t * d[2]) ** 2) <= self.r ** 2

    def centre(self):
        return (np.asarray(self.p0, float) + np.asarray(self.p1, float)) / 2

    def at(self, t: float) -> Vec:
        a, b = np.asarray(self.p0, float), np.asarray(self.p1, float)
        return tuple(float(v) for v in a + t * (b - a))


@dataclass(frozen=True)
class Difference(Shape):
    """``a`` without ``b``: shells and rims."""

    a: Shape
    b: Shape

    def bounds(self):
        return self.a.bounds()

    def inside(self, x, y, z):
        return self.a.inside(x, y, z) & ~self.b.inside(x, y, z)

    def centre(self):
        return self.a.centre()


@dataclass(frozen=True)
class Intersection(Shape):
    """``a`` restricted to ``b`` (a pattern clipped to an organ)."""

    a: Shape
    b: Shape

    def bounds(self):
        (la, ha), (lb, hb) = self.a.bounds(), self.b.bounds()
        return np.maximum(la, lb), np.minimum(ha, hb)

    def inside(self, x, y, z):
        return self.a.inside(x, y, z) & self.b.inside(x, y, z)

    def centre(self):
        return self.a.centre()


@dataclass(frozen=True)
class Checker(Shape):
    """Alternate cubic cells of side ``cell`` mm; the parity picks one colour (mosaic)."""

    cell: float
    phase: Vec
    parity: int

    def bounds(self):
        return np.full(3, -math.inf), np.full(3, math.inf)

    def inside(self, x, y, z):
        k = (np.floor((x - self.phase[0]) / self.cell) + np.floor((y - self.phase[1]) / self.cell)
             + np.floor((z - self.phase[2]) / self.cell))
        return (k % 2) == self.parity


@dataclass(frozen=True)
class Lattice(Shape):
    """Thin planes every ``cell`` mm in x and y: a line grid on every axial slice."""

    cell: float
    width: float
    phase: Vec

    def bounds(self):
        return np.full(3, -math.inf), np.full(3, math.inf)

    def inside(self, x, y, z):
        lines = ((np.mod(x - self.phase[0], self.cell) < self.width)
                 | (np.mod(y - self.phase[1], self.cell) < self.width))
        return lines & np.ones_like(z, dtype=bool)  # the same grid on every slice


# --------------------------------------------------------------------------- canvas

@lru_cache(maxsize=32)
def _axes(shape: tuple[int, int, int], spacing: Vec, shift: Vec) -> tuple[np.ndarray, ...]:
    """Voxel-centre coordinates (mm) per axis, computed once per geometry."""
    out = []
    for n, s, d in zip(shape, spacing, shift):
        axis = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * s - d
        axis.setflags(write=False)
        out.append(axis)
    return tuple(out)


def affine_for(shape: tuple[int, int, int], spacing: Vec, corner: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """RAS+ affine with the field-of-view centre at the origin; ``corner`` offsets a cut patch."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [(c - (n - 1) / 2) * s for n, s, c in zip(shape, spacing, corner)]
    return affine


class Canvas:
    """HU and tissue volumes plus the coordinate axes; shapes are painted into both."""

    def __init__(self, shape: tuple[int, int, int], spacing: Vec, shift: Vec = (0.0, 0.0, 0.0),
                 background: float = -1000.0):
        self.shape = tuple(shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.x, self.y, self.z = _axes(self.shape, self.spacing, tuple(float(s) for s in shift))
        self.hu = np.full(self.shape, background, dtype=np.float32)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        self.regions: dict[str, np.ndarray] = {}

    def _slices(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...] | None:
        out = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            start = int(np.searchsorted(axis, a, side="left"))
            stop = int(np.searchsorted(axis, b, side="right"))
            if stop <= start:
                return None
            out.append(slice(start, stop))
        return tuple(out)

    def nearest(self, point: np.ndarray) -> tuple[int, int, int] | None:
        """Index of the voxel whose centre is closest to ``point`` (None outside the volume)."""
        idx = []
        for axis, p in zip((self.x, self.y, self.z), point):
            i = int(round((p - axis[0]) / (axis[1] - axis[0])))
            if not 0 <= i < len(axis):
                return None
            idx.append(i)
        return tuple(idx)

    def select(self, shape: Shape, *, region: str | None = None,
               within: tuple[int, ...] | None = None) -> tuple[tuple[slice, ...] | None, np.ndarray | None]:
        """The voxels of ``shape`` (optionally only in a named region or among given tissues)."""
        sl = self._slices(*shape.bounds())
        if sl is None:
            return None, None
        m = shape.inside(self.x[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.z[sl[2]][None, None, :])
        m = np.broadcast_to(m, tuple(s.stop - s.start for s in sl))
        if region is not None:
            m = m & self.regions[region][sl]
        if within is not None:
            lut = np.zeros(256, dtype=bool)
            lut[list(within)] = True
            m = m & lut[self.tissue[sl]]
        return sl, m

    def paint(self, shape: Shape, hu: float, tissue: int, *, region: str | None = None,
              within: tuple[int, ...] | None = None, ensure: bool = False) -> int:
        """Set HU and tissue inside ``shape``; with ``ensure`` a sub-voxel shape still marks
        its nearest voxel, so a small lesion is never silently lost. Returns the voxel count."""
        sl, m = self.select(shape, region=region, within=within)
        count = 0 if m is None else int(m.sum())
        if count:
            self.hu[sl][m] = hu
            self.tissue[sl][m] = tissue
            return count
        if ensure:
            idx = self.nearest(shape.centre())
            ok = idx is not None and (region is None or self.regions[region][idx]) and (
                within is None or int(self.tissue[idx]) in within)
            if ok:
                self.hu[idx] = hu
                self.tissue[idx] = tissue
                return 1
        return 0


# --------------------------------------------------------------------------- image formation

@dataclass(frozen=True)
class Scanner:
    """Acquisition settings that differ between sites: the demo's domain shift."""

    spacing: Vec = (5.0, 5.0, 8.0)
    noise: float = 14.0        # HU (or MRI units) standard deviation after smoothing
    smooth: float = 0.5        # Gaussian blur in voxels (reconstruction kernel)
    offset: float = 0.0        # calibration offset added to every voxel
    contrast: float | None = None  # blood HU with intravenous contrast; None for plain CT
    shape: tuple[int, int, int] = (64, 64, 32)


@lru_cache(maxsize=16)
def _noise_gain(sigma: float, truncate: float = 3.0) -> float:
    """How much a Gaussian blur shrinks white noise; lets noise be set after smoothing."""
    if sigma <= 0:
        return 1.0
    radius = int(truncate * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w /= w.sum()
    return float(np.sqrt((w ** 2).sum()) ** 3)


def acquire_ct(hu: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Blur, correlated noise and calibration offset; int16 HU as a scanner stores it."""
    noise = rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(scanner.noise / _noise_gain(scanner.smooth))
    image = hu + noise
    if scanner.smooth > 0:
        image = ndimage.gaussian_filter(image, scanner.smooth, truncate=3.0)
    image += np.float32(scanner.offset)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def acquire_mri(signal: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Magnitude image with Rician-like noise (MRI has no absolute intensity scale)."""
    image = ndimage.gaussian_filter(signal, scanner.smooth, truncate=3.0) if scanner.smooth > 0 else signal
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(scanner.noise)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(scanner.noise)
    image = np.sqrt((image + n1) ** 2 + n2 ** 2) + np.float32(scanner.offset)
    return np.clip(np.rint(image), 0, 4095).astype(np.int16)


# --------------------------------------------------------------------------- chest anatomy

LOBES = {  # lobe -> (side, (v range: posterior..anterior), (w range: inferior..superior))
    "right upper lobe": ("R", (-0.5, 0.5), (0.2, 0.7)),
    "right middle lobe": ("R", (0.15, 0.6), (-0.35, 0.05)),
    "right lower lobe": ("R", (-0.65, 0.0), (-0.75, -0.15)),
    "left upper lobe": ("L", (-0.4, 0.5), (0.05, 0.7)),
    "left lower lobe": ("L", (-0.65, 0.05), (-0.75, -0.15)),
}
SIDE_NAME = {"R": "right", "L": "left"}


@dataclass(frozen=True)
class Chest:
    """One patient's thoracic anatomy: sizes and positions sampled per patient."""

    body: Cylinder
    fat: float
    lung: dict[str, Ellipsoid]
    heart: Ellipsoid
    mediastinum: Ellipsoid
    aorta: tuple[Tube, ...]
    arteries: tuple[Tube, ...]  # pulmonary trunk, left/right PA, lobar branches (with their lung side)
    artery_side: tuple[str, ...]
    trachea: Tube
    bronchi: tuple[Tube, ...]
    bronchus_side: tuple[str, ...]
    esophagus: Tube
    spine: Cylinder
    liver: Ellipsoid
    stomach: Ellipsoid

    def lung_name(self, side: str) -> str:
        return "lung_right" if side == "R" else "lung_left"


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _add(p: Vec, d: Vec) -> Vec:
    return (p[0] + d[0], p[1] + d[1], p[2] + d[2])


def sample_chest(rng: np.random.Generator) -> Chest:
    """Random but plausible thorax: every patient differs in size and position."""
    bx, by = _u(rng, 122, 142), _u(rng, 88, 104)
    cy = _u(rng, -8, 0)
    lz = _u(rng, 8, 22)
    lungs = {}
    for side, sign in (("R", 1.0), ("L", -1.0)):
        rx = _u(rng, 44, 54) * (1.0 if side == "R" else 0.93)
        lungs[side] = Ellipsoid((sign * _u(rng, 52, 62), cy + _u(rng, -4, 4), lz + _u(rng, -4, 4)),
                                (rx, _u(rng, 62, 72), _u(rng, 94, 106)))
    heart_r = _u(rng, 0.92, 1.08)
    heart = Ellipsoid((_u(rng, -24, -12), cy + _u(rng, 24, 32), lz - _u(rng, 55, 65)),
                      (50 * heart_r, 40 * heart_r, 40 * heart_r))
    top = heart.c[2] + heart.r[2]
    asc0, arch = (_u(rng, 0, 10), cy + 25, top - 10), (_u(rng, 0, 10), cy + 18, top + 55)
    desc0 = (_u(rng, -22, -12), cy - 42, top + 58)
    aorta = (Tube(asc0, arch, 14.0), Tube(arch, desc0, 13.0), Tube(desc0, (desc0[0] - 3, cy - 46, -130.0), 12.0))
    hub = (heart.c[0] + 5, cy + 18, top + 15)
    arteries = [Tube((heart.c[0] + 5, cy + 32, top - 15), hub, 13.0)]
    sides = ["C"]
    for side, sign in (("R", 1.0), ("L", -1.0)):
        hilum = (sign * 40, cy - 2, top + 10)
        lung = lungs[side]
        arteries.append(Tube(hub, hilum, 10.0))
        arteries.append(Tube(hilum, lung.point(sign * 0.35, -0.35, -0.6), 6.5))
        arteries.append(Tube(hilum, lung.point(sign * 0.3, 0.05, 0.55), 6.0))
        sides += [side, side, side]
    carina = (0.0, cy - 4, top + 30)
    trachea = Tube((0.0, cy - 4, 140.0), carina, 9.0)
    bronchi, bsides = [], []
    for side, sign in (("R", 1.0), ("L", -1.0)):
        lung = lungs[side]
        main_end = (sign * 34, cy - 8, carina[2] - 18)
        bronchi.append(Tube(carina, main_end, 6.5))
        for target in ((0.45, -0.4, -0.55), (0.4, 0.1, 0.5), (0.55, 0.35, -0.1), (0.6, -0.2, 0.05)):
            bronchi.append(Tube(main_end, lung.point(sign * target[0], target[1], target[2]), 4.0))
        bsides += [side] * 5
    esophagus = Tube((_u(rng, -8, -2), cy - 28, 140.0), (_u(rng, -14, -6), cy - 30, -130.0), 7.0)
    return Chest(
        body=Cylinder(0.0, cy, bx, by), fat=_u(rng, 8, 18), lung=lungs, heart=heart,
        mediastinum=Ellipsoid((0.0, cy + 12, lz + 10), (34, 46, 95)), aorta=aorta,
        arteries=tuple(arteries), artery_side=tuple(sides), trachea=trachea,
        bronchi=tuple(bronchi), bronchus_side=tuple(bsides), esophagus=esophagus,
        spine=Cylinder(0.0, cy - by + 30, 17, 15),
        liver=Ellipsoid((45.0, cy + 5, lz - 125), (95, 75, 55)),
        stomach=Ellipsoid((-55.0, cy + 15, lz - 120), (45, 40, 35)),
    )


def _blood(contrast: float | None) -> float:
    return HU[T.AORTA] if contrast is None else contrast


def draw_chest(canvas: Canvas, chest: Chest, contrast: float | None = None) -> None:
    """Paint the thorax; records the lung regions that lung lesions are confined to."""
    blood = _blood(contrast)
    body = chest.body
    canvas.paint(body, HU[T.FAT], T.FAT)
    canvas.paint(Cylinder(body.cx, body.cy, body.rx - chest.fat, body.ry - chest.fat), HU[T.MUSCLE], T.MUSCLE)
    canvas.paint(chest.liver, 60 if contrast is None else 110, T.LIVER, within=(T.MUSCLE,))
    canvas.paint(chest.stomach, 30, T.STOMACH, within=(T.MUSCLE,))
    for side in ("R", "L"):
        lung_t = T.LUNG_R if side == "R" else T.LUNG_L
        canvas.paint(chest.lung[side], HU[lung_t], lung_t, within=(T.MUSCLE, T.LIVER, T.STOMACH))
    canvas.paint(chest.mediastinum, HU[T.MED_FAT], T.MED_FAT, within=(T.MUSCLE, *LUNGS))
    _draw_heart(canvas, chest.heart, contrast)
    for tube in chest.aorta:
        canvas.paint(tube, blood, T.AORTA)
    for tube, side in zip(chest.arteries, chest.artery_side):
        if tube.r >= 9:  # trunk and main branches stay mediastinal/hilar
            canvas.paint(tube, blood, T.PULM_ARTERY)
    canvas.paint(chest.esophagus, HU[T.ESOPHAGUS], T.ESOPHAGUS)
    canvas.paint(Tube(chest.trachea.p0, chest.trachea.p1, chest.trachea.r + 2.5), HU[T.AIRWAY_WALL], T.AIRWAY_WALL)
    canvas.paint(chest.trachea, HU[T.TRACHEA], T.TRACHEA)
    _draw_bones(canvas, chest)
    canvas.regions["lung_right"] = canvas.tissue == T.LUNG_R
    canvas.regions["lung_left"] = canvas.tissue == T.LUNG_L
    canvas.regions["lung"] = canvas.regions["lung_right"] | canvas.regions["lung_left"]
    for tube in chest.bronchi:
        draw_airway(canvas, tube, wall=1.5)
    for tube in chest.arteries:
        if tube.r < 9:
            canvas.paint(tube, blood, T.PULM_ARTERY, within=(*LUNGS, T.MED_FAT, T.MUSCLE))


def _draw_heart(canvas: Canvas, heart: Ellipsoid, contrast: float | None) -> None:
    """Plain CT: one soft-tissue blob. CTPA: bright chambers inside a myocardial wall."""
    canvas.paint(heart, HU[T.HEART] if contrast is None else 110, T.HEART)
    if contrast is not None:
        canvas.paint(heart.grown(-11), contrast, T.BLOOD_POOL)


def _draw_bones(canvas: Canvas, chest: Chest) -> None:
    """Vertebral column, ribs and sternum: the bright landmarks every real chest CT has."""
    body, spine = chest.body, chest.spine
    canvas.paint(spine, 380, T.BONE)
    canvas.paint(Cylinder(spine.cx, spine.cy - spine.ry - 8, 8, 8), 700, T.BONE)
    rx, ry = body.rx - chest.fat - 4, body.ry - chest.fat - 4
    top = chest.lung["R"].c[2] + chest.lung["R"].r[2]
    for z in np.arange(top - 10, -125, -26.0):
        ring = Difference(Cylinder(body.cx, body.cy, rx, ry, z - 5, z + 5),
                          Cylinder(body.cx, body.cy, rx - 7, ry - 7, z - 5, z + 5))
        canvas.paint(Intersection(ring, Cylinder(body.cx, body.cy - ry, rx + 1, 1.5 * ry)), 650, T.BONE)
    canvas.paint(Cylinder(0.0, body.cy + body.ry - chest.fat - 6, 13, 6, -60, 110), 500, T.BONE)


def draw_airway(canvas: Canvas, tube: Tube, wall: float, *, lumen_scale: float = 1.0) -> None:
    """An air tube with a soft-tissue wall (normal, thickened or dilated bronchus)."""
    lumen = Tube(tube.p0, tube.p1, tube.r * lumen_scale)
    canvas.paint(Tube(tube.p0, tube.p1, lumen.r + wall), HU[T.AIRWAY_WALL], T.AIRWAY_WALL,
                 within=(*LUNGS, T.MED_FAT, T.AIRWAY_WALL, T.BRONCHUS, T.MUSCLE))
    canvas.paint(lumen, HU[T.BRONCHUS], T.BRONCHUS,
                 within=(*LUNGS, T.MED_FAT, T.AIRWAY_WALL, T.BRONCHUS, T.MUSCLE, T.TRACHEA))


# --------------------------------------------------------------------------- abdomen (BTCV)

@dataclass(frozen=True)
class Abdomen:
    """Upper-abdominal organs as rough ellipsoids and tubes, sampled per patient."""

    body: Cylinder
    fat: float
    organs: tuple[tuple[int, Shape, float], ...]  # (tissue, shape, HU), painted in order


ABDOMEN_HU = {  # portal-venous phase values, far enough apart to be told apart
    T.LIVER: 105, T.SPLEEN: 120, T.KIDNEY_R: 175, T.KIDNEY_L: 175, T.GALLBLADDER: 8,
    T.STOMACH: 25, T.PANCREAS: 85, T.AORTA: 200, T.IVC: 150, T.PORTAL_VEIN: 165,
    T.ADRENAL_R: 55, T.ADRENAL_L: 55, T.ESOPHAGUS: 40,
}


def sample_abdomen(rng: np.random.Generator) -> Abdomen:
    """An upper abdomen (liver dome to kidneys) with per-patient organ jitter."""
    bx, by = _u(rng, 130, 148), _u(rng, 95, 112)
    cy = _u(rng, -6, 4)

    def j(p: Vec, s: float = 8.0) -> Vec:
        return _add(p, tuple(float(v) for v in rng.uniform(-s, s, 3)))

    def k(r: Vec, lo: float = 0.85, hi: float = 1.15) -> Vec:
        return tuple(v * _u(rng, lo, hi) for v in r)

    kz = _u(rng, -50, -30)
    organs = [
        (T.LUNG_R, Ellipsoid(j((55, cy, 130)), (50, 65, 50)), -860.0),
        (T.LUNG_L, Ellipsoid(j((-55, cy, 130)), (46, 65, 50)), -860.0),
        (T.LIVER, Ellipsoid(j((55, cy + 10, 40)), k((85, 75, 70))), ABDOMEN_HU[T.LIVER]),
        (T.SPLEEN, Ellipsoid(j((-85, cy - 35, 40)), k((28, 40, 45))), ABDOMEN_HU[T.SPLEEN]),
        (T.STOMACH, Ellipsoid(j((-45, cy + 35, 55)), k((40, 35, 45))), ABDOMEN_HU[T.STOMACH]),
        (T.KIDNEY_R, Ellipsoid(j((62, cy - 50, kz - 10)), k((24, 28, 50))), ABDOMEN_HU[T.KIDNEY_R]),
        (T.KIDNEY_L, Ellipsoid(j((-62, cy - 50, kz)), k((24, 28, 50))), ABDOMEN_HU[T.KIDNEY_L]),
        (T.GALLBLADDER, Ellipsoid(j((45, cy + 50, 0)), k((16, 18, 30))), ABDOMEN_HU[T.GALLBLADDER]),
        (T.PANCREAS, Ellipsoid(j((-15, cy - 5, 5), 5), k((60, 12, 14))), ABDOMEN_HU[T.PANCREAS]),
        (T.ADRENAL_R, Ellipsoid(j((42, cy - 38, kz + 60), 4), (8, 6, 16)), ABDOMEN_HU[T.ADRENAL_R]),
        (T.ADRENAL_L, Ellipsoid(j((-42, cy - 38, kz + 66), 4), (8, 6, 16)), ABDOMEN_HU[T.ADRENAL_L]),
        (T.AORTA, Tube((-15, cy - 48, 130), (-15, cy - 45, -130), _u(rng, 10, 13)), ABDOMEN_HU[T.AORTA]),
        (T.IVC, Tube((22, cy - 38, 130), (20, cy - 38, -130), _u(rng, 10, 13)), ABDOMEN_HU[T.IVC]),
        (T.PORTAL_VEIN, Tube(j((35, cy + 5, 30), 4), j((-60, cy - 20, 15), 4), 6.5), ABDOMEN_HU[T.PORTAL_VEIN]),
        (T.ESOPHAGUS, Tube((-10, cy - 32, 130), (-25, cy + 15, 70), 7.0), ABDOMEN_HU[T.ESOPHAGUS]),
    ]
    return Abdomen(Cylinder(0.0, cy, bx, by), _u(rng, 12, 25), tuple((int(t), s, float(h)) for t, s, h in organs))


def draw_abdomen(canvas: Canvas, abdomen: Abdomen) -> None:
    """Body wall, then organs (later ones win where they touch), then the spine."""
    body = abdomen.body
    canvas.paint(body, HU[T.FAT], T.FAT)
    canvas.paint(Cylinder(body.cx, body.cy, body.rx - abdomen.fat, body.ry - abdomen.fat), -60, T.MED_FAT)
    canvas.paint(Difference(Cylinder(body.cx, body.cy, body.rx - abdomen.fat, body.ry - abdomen.fat),
                            Cylinder(body.cx, body.cy, body.rx - abdomen.fat - 10, body.ry - abdomen.fat - 10)),
                 HU[T.MUSCLE], T.MUSCLE)
    for tissue, shape, hu in abdomen.organs:
        canvas.paint(shape, hu, tissue, within=(T.MED_FAT, T.MUSCLE, T.LUNG_R, T.LUNG_L, T.LIVER, T.PANCREAS))
    canvas.paint(Cylinder(0.0, body.cy - body.ry + 32, 19, 16), 380, T.BONE)
    canvas.paint(Cylinder(0.0, body.cy - body.ry + 10, 9, 8), 700, T.BONE)


# --------------------------------------------------------------------------- cardiac MRI (ACDC)

@dataclass(frozen=True)
class CardiacMRI:
    """Ventricles at end-diastole; end-systole is derived by contraction."""

    body: Cylinder
    lv: Ellipsoid
    wall: float
    rv: Ellipsoid
    lungs: tuple[Ellipsoid, Ellipsoid]
    liver: Ellipsoid
    ejection: float  # fraction by which the LV radii shrink at end-systole


MRI_SIGNAL = {T.FAT: 700.0, T.MUSCLE: 220.0, T.LUNG_R: 30.0, T.LIVER: 300.0, T.BLOOD_POOL: 650.0,
              T.MYOCARDIUM: 150.0}


def sample_cardiac(rng: np.random.Generator) -> CardiacMRI:
    """A patient's ventricles; ejection varies, as between healthy and failing hearts."""
    c = (_u(rng, -20, -5), _u(rng, 5, 20), _u(rng, -15, 15))
    lv = Ellipsoid(c, (_u(rng, 22, 30), _u(rng, 22, 30), _u(rng, 38, 50)))
    rv = Ellipsoid((c[0] + _u(rng, 24, 30), c[1] + _u(rng, 10, 16), c[2] - 5),
                   (_u(rng, 28, 34), _u(rng, 22, 28), _u(rng, 36, 46)))
    return CardiacMRI(Cylinder(0.0, 0.0, _u(rng, 120, 135), _u(rng, 90, 105)), lv, _u(rng, 8, 11), rv,
                      (Ellipsoid((60, -10, 20), (45, 65, 90)), Ellipsoid((-65, -10, 20), (42, 65, 90))),
                      Ellipsoid((50, 0, -110), (80, 70, 55)), _u(rng, 0.55, 0.85))


def draw_cardiac(canvas: Canvas, heart: CardiacMRI, systole: bool) -> None:
    """Bright blood, dark myocardium (cine SSFP); systole shrinks cavities and thickens the wall."""
    s = heart.ejection if systole else 1.0
    lv = heart.lv.scaled((s, s, 0.5 + 0.5 * s))
    wall = heart.wall * (1.35 if systole else 1.0)
    rv = heart.rv.scaled((0.5 + 0.5 * s, 0.6 + 0.4 * s, 0.75 + 0.25 * s))
    canvas.paint(heart.body, MRI_SIGNAL[T.FAT], T.FAT)
    canvas.paint(Cylinder(0.0, 0.0, heart.body.rx - 12, heart.body.ry - 12), MRI_SIGNAL[T.MUSCLE], T.MUSCLE)
    for lung in heart.lungs:
        canvas.paint(lung, MRI_SIGNAL[T.LUNG_R], T.LUNG_R, within=(T.MUSCLE,))
    canvas.paint(heart.liver, MRI_SIGNAL[T.LIVER], T.LIVER, within=(T.MUSCLE, T.LUNG_R))
    canvas.paint(Ellipsoid(lv.c, tuple(r + wall + 5 for r in lv.r)), MRI_SIGNAL[T.FAT], T.FAT)  # epicardial fat
    canvas.paint(rv.grown(4), MRI_SIGNAL[T.FAT], T.FAT)
    canvas.paint(rv.grown(2), MRI_SIGNAL[T.MYOCARDIUM], T.MUSCLE)  # thin RV free wall, not labelled
    canvas.paint(rv, MRI_SIGNAL[T.BLOOD_POOL], T.RV)
    canvas.paint(lv.grown(wall), MRI_SIGNAL[T.MYOCARDIUM], T.MYOCARDIUM)
    canvas.paint(lv, MRI_SIGNAL[T.BLOOD_POOL], T.LV)


# --------------------------------------------------------------------------- lesions

Record = dict


def in_lung(chest: Chest, point: Vec, side: str) -> bool:
    """Whether ``point`` lies in aerated lung, decided on the anatomy (not the voxels), so a
    rescan of the same patient in another position places its lesions identically."""
    x, y, z = point
    return bool(chest.lung[side].inside(x, y, z) and not chest.heart.grown(8).inside(x, y, z)
                and not chest.mediastinum.inside(x, y, z))


def lobe_point(chest: Chest, lobe: str, rng: np.random.Generator, margin: float = 0.0) -> Vec:
    """A random point inside ``lobe`` (rejection sampling on the lung minus heart and mediastinum)."""
    side, (v0, v1), (w0, w1) = LOBES[lobe]
    lung = chest.lung[side]
    sign = 1.0 if side == "R" else -1.0
    for _ in range(60):
        u, v, w = _u(rng, -0.2, 0.6), _u(rng, v0, v1), _u(rng, w0, w1)
        if u * u + v * v + w * w > (0.8 - margin) ** 2:
            continue
        candidate = lung.point(sign * u, v, w)
        if in_lung(chest, candidate, side):
            return candidate
    return lung.point(sign * 0.45, (v0 + v1) / 2, (w0 + w1) / 2)


def pick_lobe(rng: np.random.Generator, lobes: tuple[str, ...] = tuple(LOBES)) -> str:
    return str(lobes[int(rng.integers(len(lobes)))])


def pick_side(rng: np.random.Generator, p_both: float = 0.3) -> tuple[str, ...]:
    if rng.random() < p_both:
        return ("R", "L")
    return ("R",) if rng.random() < 0.5 else ("L",)


def sides_word(sides: tuple[str, ...]) -> str:
    return "bilateral" if len(sides) == 2 else SIDE_NAME[sides[0]]


def draw_medical_material(canvas, chest, rng, contrast=None) -> Record:
    """A metal device (pacemaker or port) in the chest wall: a few voxels at 3000 HU."""
    kind = "pacemaker" if rng.random() < 0.6 else "central venous port"
    sign = -1.0 if kind == "pacemaker" else 1.0
    body = chest.body
    c = (sign * _u(rng, 45, 70), body.cy + body.ry * _u(rng, 0.72, 0.82), chest.heart.c[2] + _u(rng, 70, 100))
    canvas.paint(Ellipsoid(c, (_u(rng, 11, 15), 7.0, _u(rng, 9, 12))), 3000, T.METAL, ensure=True)
    tip = _add(chest.heart.c, (_u(rng, 0, 20), 5.0, 10.0))
    canvas.paint(Tube(c, tip, 2.0), 2500, T.METAL, ensure=True)
    return {"device": kind}


def draw_arterial_calcification(canvas, chest, rng, contrast=None) -> Record:
    """Calcified plaques: bright spots on the wall of the arch and descending aorta."""
    n = int(rng.integers(3, 7))
    for _ in range(n):
        tube = chest.aorta[int(rng.integers(1, 3))]
        centre = tube.at(_u(rng, 0.1, 0.9))
        angle = _u(rng, 0, 2 * math.pi)
        spot = _add(centre, (tube.r * math.cos(angle), tube.r * math.sin(angle), 0.0))
        canvas.paint(Ellipsoid(spot, (6.0, 6.0, 7.0)), 1200, T.CALCIUM, ensure=True)
    return {"location": "aortic arch and descending aorta", "count": n}


def draw_cardiomegaly(canvas, chest, rng, contrast=None) -> Record:
    """Drawn through the anatomy (see ``adjust_chest``); the record carries the ratio."""
    return {"ratio": round(chest.heart.r[0] * 2 / (chest.body.rx * 2), 2)}


def draw_pericardial_effusion(canvas, chest, rng, contrast=None) -> Record:
    """A near-water rim (about 10 HU) wrapped round the heart."""
    thick = _u(rng, 7, 13)
    canvas.paint(Difference(chest.heart.grown(thick), chest.heart), 10, T.PERICARDIAL_FLUID,
                 within=(*LUNGS, T.MED_FAT, T.MUSCLE, T.PULM_ARTERY))
    return {"size_mm": round(thick)}


def draw_coronary_calcification(canvas, chest, rng, contrast=None) -> Record:
    """Bright dots just inside the upper-left heart surface, where the coronaries run."""
    n = int(rng.integers(2, 5))
    h = chest.heart
    for _ in range(n):
        theta, phi = _u(rng, 0.2, 1.3), _u(rng, 1.7, 2.8)  # anterior-left-superior octant
        d = (math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi) * 0.8 + 0.4, math.cos(theta))
        norm = math.sqrt(sum(v * v for v in d))
        spot = tuple(c + 0.88 * r * v / norm for c, r, v in zip(h.c, h.r, d))
        canvas.paint(Ellipsoid(spot, (6.0, 6.0, 7.0)), 1200, T.CALCIUM, ensure=True)
    return {"location": "left anterior descending and circumflex arteries", "count": n}


def draw_hiatal_hernia(canvas, chest, rng, contrast=None) -> Record:
    """A soft-tissue sac with an air pocket beside the oesophagus, below the heart."""
    e = chest.esophagus
    z = chest.heart.c[2] - chest.heart.r[2] * _u(rng, 0.4, 0.8)
    c = (e.at(0.5)[0] - _u(rng, 0, 10), e.p0[1] + _u(rng, 8, 16), z)
    r = (_u(rng, 20, 30), _u(rng, 18, 24), _u(rng, 18, 26))
    keep = (*LUNGS, T.MED_FAT, T.MUSCLE, T.HEART, T.ESOPHAGUS, T.LIVER, T.STOMACH, T.BLOOD_POOL)
    canvas.paint(Ellipsoid(c, r), 30, T.HERNIA, within=keep)
    canvas.paint(Ellipsoid(_add(c, (0, 0, r[2] * 0.3)), (r[0] * 0.6, r[1] * 0.6, r[2] * 0.45)), -1000, T.HERNIA,
                 within=(T.HERNIA,))
    return {"size_mm": round(2 * r[0])}


NODE_STATIONS = {
    "right paratracheal": (14.0, 0.0, 55.0), "subcarinal": (0.0, -16.0, 8.0),
    "aortopulmonary window": (-18.0, 6.0, 40.0), "right hilar": (36.0, -2.0, 12.0), "left hilar": (-38.0, -2.0, 8.0),
}


def draw_lymphadenopathy(canvas, chest, rng, contrast=None) -> Record:
    """Round soft-tissue nodes (45 HU) at mediastinal and hilar stations."""
    names = list(NODE_STATIONS)
    chosen = sorted(rng.choice(len(names), size=int(rng.integers(2, 4)), replace=False).tolist())
    carina_z, cy = chest.trachea.p1[2], chest.body.cy
    sizes = []
    for i in chosen:
        dx, dy, dz = NODE_STATIONS[names[i]]
        r = _u(rng, 8, 12)
        sizes.append(2 * r)
        canvas.paint(Ellipsoid((dx, cy + dy, carina_z + dz - 30), (r, r, r * 1.1)), 45, T.LYMPH_NODE,
                     within=(*LUNGS, T.MED_FAT, T.MUSCLE), ensure=True)
    return {"location": ", ".join(names[i] for i in chosen), "size_mm": round(max(sizes))}


def draw_emphysema(canvas, chest, rng, contrast=None) -> Record:
    """Near-air lucencies (-970 HU) in the upper lobes."""
    sides = pick_side(rng, p_both=0.7)
    for side in sides:
        lobe = f"{SIDE_NAME[side]} upper lobe"
        for _ in range(int(rng.integers(2, 4))):
            r = _u(rng, 12, 20)
            c = lobe_point(chest, lobe, rng)
            canvas.paint(Ellipsoid(c, (r, r, r * 1.2)), -970, T.EMPHYSEMA, region="lung")
    return {"location": "upper lobes" if len(sides) == 2 else f"{SIDE_NAME[sides[0]]} upper lobe"}


def draw_atelectasis(canvas, chest, rng, contrast=None) -> Record:
    """A dense (35 HU) flattened wedge at the posterior lung base."""
    side = "R" if rng.random() < 0.5 else "L"
    lung = chest.lung[side]
    sign = 1.0 if side == "R" else -1.0
    c = lung.point(sign * _u(rng, 0.0, 0.3), -0.75, -0.6)
    canvas.paint(Ellipsoid(c, (lung.r[0] * 0.5, _u(rng, 14, 20), _u(rng, 18, 26))), 35, T.ATELECTASIS,
                 region=chest.lung_name(side))
    return {"location": f"{SIDE_NAME[side]} lower lobe"}


def draw_lung_nodule(canvas, chest, rng, contrast=None, *, count: int = 1) -> Record:
    """Solid spheres (30 HU) of 10-20 mm, each in a random lobe; the first one is reported."""
    nodules = []
    for _ in range(count):
        lobe = pick_lobe(rng)
        d = float(rng.integers(10, 21))
        c = lobe_point(chest, lobe, rng, margin=0.1)
        canvas.paint(Ellipsoid(c, (d / 2, d / 2, d / 2)), 30, T.NODULE, region="lung", ensure=True)
        nodules.append({"location": lobe, "size_mm": int(d), "centre": c})
    return {**nodules[0], "nodules": nodules}


def draw_lung_opacity(canvas, chest, rng, contrast=None) -> Record:
    """A ground-glass patch (-500 HU)."""
    lobe = pick_lobe(rng)
    r = _u(rng, 14, 24)
    canvas.paint(Ellipsoid(lobe_point(chest, lobe, rng), (r, r, r * 1.2)), -500, T.GGO, region="lung")
    return {"location": lobe, "size_mm": round(2 * r)}


def draw_fibrotic_sequela(canvas, chest, rng, contrast=None) -> Record:
    """Reticular streaks: thin dense lines radiating through one lobe."""
    lobe = pick_lobe(rng)
    c = lobe_point(chest, lobe, rng)
    for _ in range(int(rng.integers(5, 9))):
        d = rng.normal(size=3)
        d = d / np.linalg.norm(d) * _u(rng, 16, 30)
        canvas.paint(Tube(_add(c, tuple(-d)), _add(c, tuple(d)), 3.5), -60, T.FIBROSIS, region="lung", ensure=True)
    return {"location": lobe}


def draw_pleural_effusion(canvas, chest, rng, contrast=None) -> Record:
    """A dependent fluid crescent (10 HU) along the posterior lung base."""
    sides = pick_side(rng, p_both=0.4)
    depth = _u(rng, 14, 30)
    for side in sides:
        lung = chest.lung[side]
        c = (lung.c[0], lung.c[1] - lung.r[1], lung.c[2] - lung.r[2] * 0.45)
        canvas.paint(Ellipsoid(c, (lung.r[0] * 1.3, depth * 1.6, lung.r[2] * 0.75)), 10, T.PLEURAL_FLUID,
                     region=chest.lung_name(side))
    return {"location": sides_word(sides), "size_mm": round(depth)}


def draw_mosaic_attenuation(canvas, chest, rng, contrast=None) -> Record:
    """Lobules alternately darker (-900) and brighter (-790) than normal lung."""
    cell = _u(rng, 22, 30)
    phase = tuple(float(v) for v in rng.uniform(0, cell, 3))
    for side in ("R", "L"):
        lung = chest.lung[side]
        canvas.paint(Intersection(lung, Checker(cell, phase, 0)), -900, T.MOSAIC, region=chest.lung_name(side))
        canvas.paint(Intersection(lung, Checker(cell, phase, 1)), -790, T.MOSAIC, region=chest.lung_name(side))
    return {"location": "both lungs"}


def draw_peribronchial_thickening(canvas, chest, rng, contrast=None) -> Record:
    """Thick soft-tissue cuffs around normal-calibre bronchi."""
    for tube in chest.bronchi:
        draw_airway(canvas, tube, wall=_u(rng, 5, 7))
    return {"location": "bilateral"}


def draw_consolidation(canvas, chest, rng, contrast=None, *, lobe: str | None = None) -> Record:
    """A dense (35 HU) lobar patch with air bronchograms where bronchi cross it."""
    lobe = lobe or pick_lobe(rng)
    r = _u(rng, 22, 34)
    c = lobe_point(chest, lobe, rng)
    c = (c[0] + (0.5 * r if LOBES[lobe][0] == "R" else -0.5 * r), c[1], c[2])  # pleural-based, clipped by the lung
    shape = Ellipsoid(c, (r, r * 0.9, r * 1.2))
    canvas.paint(shape, 35, T.CONSOLIDATION, region="lung")
    for tube in chest.bronchi[1:]:
        canvas.paint(Intersection(Tube(tube.p0, tube.p1, 3.0), shape), -950, T.BRONCHUS, within=(T.CONSOLIDATION,))
    return {"location": lobe, "size_mm": round(2 * r)}


def draw_bronchiectasis(canvas, chest, rng, contrast=None) -> Record:
    """Dilated air-filled bronchi with walls, in the lower lobes."""
    sides = pick_side(rng, p_both=0.4)
    for side in sides:
        for tube, s in zip(chest.bronchi, chest.bronchus_side):
            if s == side and tube.p1[2] < tube.p0[2] and tube.r < 6:
                draw_airway(canvas, tube, wall=3.0, lumen_scale=_u(rng, 2.2, 2.8))
    return {"location": f"{sides_word(sides)} lower lobe" + ("s" if len(sides) == 2 else "")}


def draw_septal_thickening(canvas, chest, rng, contrast=None) -> Record:
    """A fine line grid (-450 HU) in the subpleural lung of the lower zones."""
    cell = _u(rng, 14, 18)
    phase = tuple(float(v) for v in rng.uniform(0, cell, 3))
    for side in ("R", "L"):
        lung = chest.lung[side]
        rim = Difference(lung, lung.grown(-16))
        lower = Intersection(rim, Ellipsoid(_add(lung.c, (0, 0, -lung.r[2] * 0.6)), (200, 200, lung.r[2] * 0.9)))
        canvas.paint(Intersection(lower, Lattice(cell, 5.0, phase)), -450, T.SEPTAL, region=chest.lung_name(side))
    return {"location": "bilateral lung bases"}


# ----- lesions outside the CT-RATE vocabulary: COVID-19 pattern, tumour, embolism

def draw_covid_pattern(canvas, chest, rng, contrast=None, *, extent: float = 0.5) -> Record:
    """Peripheral, bilateral, posterior ground glass; ``extent`` (0-1) sets how much lung."""
    n = 2 + int(round(extent * 8))
    for i in range(n):
        side = "RL"[i % 2]
        lung = chest.lung[side]
        sign = 1.0 if side == "R" else -1.0
        for _ in range(20):
            u, v, w = _u(rng, 0.3, 0.8), _u(rng, -0.8, 0.4), _u(rng, -0.7, 0.6)
            if 0.55 < u * u + v * v + w * w < 0.85:
                break
        r = _u(rng, 12, 18) + 12 * extent
        hu = -520 + 250 * extent * rng.random()
        canvas.paint(Ellipsoid(lung.point(sign * u, v, w), (r, r, r * 1.1)), hu, T.INFECTION,
                     region=chest.lung_name(side))
    return {"location": "bilateral peripheral", "extent": round(extent, 2), "patches": n}


def draw_tumour(canvas, chest, rng, contrast=None, *, lobe: str | None = None,
                radius_mm: tuple[float, float] = (8, 20)) -> Record:
    """A lobulated lung mass (40 HU): a few overlapping spheres, 16-40 mm across by default."""
    lobe = lobe or pick_lobe(rng)
    c = lobe_point(chest, lobe, rng, margin=0.15)
    radius = _u(rng, *radius_mm)
    canvas.paint(Ellipsoid(c, (radius, radius, radius)), 40, T.TUMOUR, region="lung", ensure=True)
    for _ in range(int(rng.integers(1, 3))):
        d = rng.normal(size=3)
        d = tuple(float(v) for v in d / np.linalg.norm(d) * radius * 0.6)
        r = radius * _u(rng, 0.5, 0.8)
        canvas.paint(Ellipsoid(_add(c, d), (r, r, r)), 40, T.TUMOUR, region="lung")
    return {"location": lobe, "size_mm": round(2 * radius), "centre": c}


def draw_embolism(canvas, chest, rng, contrast=None, *, count: int | None = None,
                  length_mm: tuple[float, float] = (10, 18)) -> Record:
    """Filling defects: dark (35 HU) plugs inside contrast-filled pulmonary arteries."""
    count = count or int(rng.integers(1, 4))
    names = []
    for _ in range(count):
        i = int(rng.integers(1, len(chest.arteries)))
        tube, side = chest.arteries[i], chest.artery_side[i]
        c = tube.at(_u(rng, 0.3, 0.8) if tube.r >= 9 else _u(rng, 0.15, 0.5))
        length = _u(rng, *length_mm)
        canvas.paint(Ellipsoid(c, (length, length, length)), 35, T.EMBOLUS, within=(T.PULM_ARTERY,), ensure=True)
        names.append(("main " if tube.r >= 9 else "lobar ") + f"{SIDE_NAME.get(side, 'main')} pulmonary artery")
    return {"location": ", ".join(sorted(set(names))), "count": count}


def adjust_chest(chest: Chest, findings: tuple[str, ...], rng: np.random.Generator) -> Chest:
    """Findings that change the anatomy itself (an enlarged heart) before it is drawn."""
    if "Cardiomegaly" in findings:
        k = _u(rng, 1.3, 1.45)
        h = chest.heart
        heart = Ellipsoid((h.c[0] - 8, h.c[1], h.c[2] + 5), (h.r[0] * k, h.r[1] * k, h.r[2] * k * 0.95))
        chest = replace(chest, heart=heart)
    if "Pulmonary artery enlargement" in findings:  # the dilated arteries of pulmonary hypertension
        k = _u(rng, 1.5, 1.7)
        chest = replace(chest, arteries=tuple(replace(t, r=t.r * k) for t in chest.arteries))
    return chest


def draw_artery_enlargement(canvas, chest, rng, contrast=None) -> Record:
    """Nothing to draw: ``adjust_chest`` widens the pulmonary arteries before the chest is drawn."""
    return {}


@dataclass(frozen=True)
class Finding:
    draw: Callable[..., Record]
    order: int  # drawing order: diffuse background patterns first, focal and bright last


FINDINGS: dict[str, Finding] = {
    "Mosaic attenuation pattern": Finding(draw_mosaic_attenuation, 0),
    "Emphysema": Finding(draw_emphysema, 1),
    "Interlobular septal thickening": Finding(draw_septal_thickening, 2),
    "Covid pattern": Finding(draw_covid_pattern, 3),
    "Pulmonary fibrotic sequela": Finding(draw_fibrotic_sequela, 4),
    "Lung opacity": Finding(draw_lung_opacity, 5),
    "Consolidation": Finding(draw_consolidation, 6),
    "Pleural effusion": Finding(draw_pleural_effusion, 7),
    "Atelectasis": Finding(draw_atelectasis, 8),
    "Peribronchial thickening": Finding(draw_peribronchial_thickening, 9),
    "Bronchiectasis": Finding(draw_bronchiectasis, 10),
    "Lung nodule": Finding(draw_lung_nodule, 11),
    "Tumour": Finding(draw_tumour, 12),
    "Lymphadenopathy": Finding(draw_lymphadenopathy, 13),
    "Hiatal hernia": Finding(draw_hiatal_hernia, 14),
    "Cardiomegaly": Finding(draw_cardiomegaly, 15),
    "Pericardial effusion": Finding(draw_pericardial_effusion, 16),
    "Pulmonary embolism": Finding(draw_embolism, 17),
    "Coronary artery wall calcification": Finding(draw_coronary_calcification, 18),
    "Arterial wall calcification": Finding(draw_arterial_calcification, 19),
    "Medical material": Finding(draw_medical_material, 20),
    "Pulmonary artery enlargement": Finding(draw_artery_enlargement, 21),
}


def draw_findings(canvas: Canvas, chest: Chest, findings: dict[str, dict], rng: np.random.Generator,
                  contrast: float | None = None) -> dict[str, Record]:
    """Draw each finding (name -> keyword options) in a fixed order; return their records."""
    records = {}
    for name in sorted(findings, key=lambda n: FINDINGS[n].order):
        records[name] = FINDINGS[name].draw(canvas, chest, rng, contrast, **findings[name])
    return records


def render_chest(chest: Chest, findings: dict[str, dict], scanner: Scanner, rng: np.random.Generator,
                 shift: Vec = (0.0, 0.0, 0.0)) -> tuple[Canvas, Chest, dict[str, Record]]:
    """Anatomy plus findings on a fresh canvas (before noise): the ground truth of one scan."""
    chest = adjust_chest(chest, tuple(findings), rng)
    canvas = Canvas(scanner.shape, scanner.spacing, shift)
    draw_chest(canvas, chest, scanner.contrast)
    return canvas, chest, draw_findings(canvas, chest, findings, rng, scanner.contrast)
