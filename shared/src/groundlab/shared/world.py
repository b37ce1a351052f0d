"""The synthetic shapes world: groundlab's embedded default data.

Small scenes of coloured shapes with exact ground truth: instance masks (visible pixels, occlusion
handled), boxes, referring expressions that each pick out exactly one object (by attribute, by a
superlative, or by a spatial relation to another uniquely named object), left-to-right captions with
per-object phrases (for grounded captioning), and question-answer pairs.

Every scene is a pure function of ``(WorldConfig, seed, split, index)``: scenes are random access and
identical on every machine. Writers in :mod:`groundlab.shared.world_io` export scenes into the real
on-disk formats (COCO instances with RLE masks, the REFER layout of RefCOCO) that the packages read
back through their real loaders.

Grammar of the referring expressions (``Ref.text``)::

    attribute:   "the [size] [colour] <kind>"
    superlative: "the leftmost|rightmost|topmost|bottommost [colour] <kind>"
    relation:    "the [colour] <kind> left of|right of|above|below <attribute expression>"

Positions are the centres of the objects' visible boxes; a spatial statement holds only with a
margin of ``WorldConfig.spatial_margin`` of the image size, so none of them is a close call.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

KINDS: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SUPERLATIVES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# A 5x5 bitmap font for the optional glyphs (regional OCR, TLDR's Text-OCR taxonomy).
_GLYPHS: dict[str, tuple[str, ...]] = {
    "a": ("01110", "10001", "11111", "10001", "10001"),
    "e": ("11111", "10000", "11110", "10000", "11111"),
    "h": ("10001", "10001", "11111", "10001", "10001"),
    "k": ("10010", "10100", "11000", "10100", "10010"),
    "l": ("10000", "10000", "10000", "10000", "11111"),
    "t": ("11111", "00100", "00100", "00100", "00100"),
    "x": ("10001", "01010", "00100", "01010", "10001"),
    "z": ("11111", "00010", "00100", "01000", "11111"),
}
GLYPH_LETTERS: tuple[str, ...] = tuple(_GLYPHS)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides what scenes look like. Hash it (``key()``) to cache derived data."""

    image_size: int = 64
    """Square images, in pixels. Shape sizes and margins scale with it."""
    min_objects: int = 1
    max_objects: int = 3
    kinds: tuple[str, ...] = KINDS
    colours: tuple[str, ...] = tuple(COLOURS)
    small_radius: float = 0.09
    """Radius of a small shape as a fraction of ``image_size``."""
    large_radius: float = 0.17
    background: tuple[int, int, int] = (235, 235, 235)
    min_visible_fraction: float = 0.6
    """An object hidden behind others by more than 40% is resampled."""
    min_visible_pixels: int = 12
    spatial_margin: float = 0.08
    """Spatial relations need this gap between centres (fraction of ``image_size``)."""
    glyph_prob: float = 0.0
    """Probability that a large object carries a letter glyph (0 keeps the rng stream glyph-free)."""
    pixel_noise: float = 0.0
    """Std of Gaussian noise added to the rendered image, in intensity units (0-255)."""
    max_tries: int = 200

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        unknown = [k for k in self.kinds if k not in KINDS] + [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown kinds/colours {unknown}; known: {KINDS}, {tuple(COLOURS)}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")

    def key(self) -> str:
        """A stable text key of the config (used in content hashes of cached artefacts)."""
        return repr(sorted(asdict(self).items()))


@dataclass
class ShapeObject:
    """One object of a scene. ``mask`` holds its VISIBLE pixels (occlusion applied)."""

    id: int
    kind: str
    colour: str
    size: str
    center: tuple[float, float]
    """Geometric centre (x, y) of the full, unoccluded shape, in pixels."""
    radius: float
    mask: np.ndarray  # (H, W) bool, read-only
    glyph: str | None = None

    def __post_init__(self) -> None:
        # the box and area are computed once (scenes ask for them dozens of times), so the mask they
        # come from may not change: writing to it raises
        self.mask = np.asarray(self.mask, dtype=bool)
        self.mask.flags.writeable = False

    @functools.cached_property
    def bbox(self) -> tuple[int, int, int, int]:
        """COCO box ``(x, y, w, h)`` of the visible pixels (pixel-edge convention)."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)

    @functools.cached_property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def position(self) -> tuple[float, float]:
        """Centre (x, y) of the visible box: where a viewer sees the object."""
        x, y, w, h = self.bbox
        return x + w / 2.0, y + h / 2.0

    @property
    def phrase(self) -> str:
        """The full description used in captions, e.g. ``"a large red circle"``."""
        text = f"a {self.size} {self.colour} {self.kind}"
        return text + (f" with the letter {self.glyph}" if self.glyph else "")

    def describe(self) -> dict:
        x, y, w, h = self.bbox
        return {"id": self.id, "kind": self.kind, "colour": self.colour, "size": self.size,
                "bbox": [x, y, w, h], "area": self.area, "glyph": self.glyph}


@dataclass
class Ref:
    """A referring expression that names exactly one object of its scene."""

    text: str
    target: int
    type: str  # "attribute" | "superlative" | "relation"
    anchor: int | None = None


@dataclass
class QA:
    question: str
    answer: str
    type: str  # "colour" | "shape" | "size" | "count" | "exist" | "spatial" | "glyph"
    objects: list[int] = field(default_factory=list)


@dataclass
class CaptionPhrase:
    """A span of the caption grounded to one object (for GCG-style data)."""

    text: str
    object_id: int
    start: int
    end: int


@dataclass
class Scene:
    image_id: int
    split: str
    index: int
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[ShapeObject]
    refs: list[Ref]
    caption: str
    caption_phrases: list[CaptionPhrase]
    qa: list[QA]

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def instance_map(self) -> np.ndarray:
        """(H, W) int32: 0 background, ``object.id + 1`` where that object is visible."""
        out = np.zeros(self.image.shape[:2], np.int32)
        for obj in self.objects:
            out[obj.mask] = obj.id + 1
        return out

    def refs_for(self, object_id: int) -> list[Ref]:
        return [r for r in self.refs if r.target == object_id]

    def describe(self) -> dict:
        """JSON-able ground truth (no arrays)."""
        return {
            "image_id": self.image_id, "split": self.split, "index": self.index,
            "width": self.size, "height": self.size,
            "objects": [o.describe() for o in self.objects],
            "refs": [asdict(r) for r in self.refs],
            "caption": self.caption,
            "caption_phrases": [asdict(p) for p in self.caption_phrases],
            "qa": [asdict(q) for q in self.qa],
        }


# ----------------------------------------------------------------------------------------------
# rendering


def shape_mask(kind: str, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """Rasterise one full shape (no anti-aliasing, so masks are exact). Pixel centres at +0.5."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cx, cy = center
    if kind == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    if kind == "square":
        half = radius * 0.86  # about the circle's area
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if kind == "triangle":
        top, bottom = cy - radius, cy + 0.8 * radius
        half_width = (ys - top) / (bottom - top) * radius * 1.1
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape kind {kind!r}")


def _draw_glyph(image: np.ndarray, letter: str, center: tuple[float, float], radius: float) -> None:
    rows = _GLYPHS[letter]
    cell = max(1, int(radius * 0.9 / 5 * 2 / 2))
    x0 = int(round(center[0])) - (5 * cell) // 2
    y0 = int(round(center[1])) - (5 * cell) // 2
    for r, row in enumerate(rows):
        for c, bit in enumerate(row):
            if bit == "1":
                image[y0 + r * cell : y0 + (r + 1) * cell, x0 + c * cell : x0 + (c + 1) * cell] = 255


# ----------------------------------------------------------------------------------------------
# referring expressions


def _matches(obj: ShapeObject, kind: str, colour: str | None = None, size: str | None = None) -> bool:
    return obj.kind == kind and colour in (None, obj.colour) and size in (None, obj.size)


def _attribute_phrase(obj: ShapeObject, objects: list[ShapeObject]) -> list[str]:
    """All attribute expressions (shortest first) that name ``obj`` alone among ``objects``."""
    out = []
    for size, colour in ((None, None), (None, obj.colour), (obj.size, None), (obj.size, obj.colour)):
        hits = [o for o in objects if _matches(o, obj.kind, colour, size)]
        if len(hits) == 1:
            words = [w for w in ("the", size, colour, obj.kind) if w]
            out.append(" ".join(words))
    return out


def holds(relation: str, a: ShapeObject, b: ShapeObject, margin: float) -> bool:
    """Whether ``a <relation> b`` holds clearly (by at least ``margin`` pixels between centres)."""
    (ax, ay), (bx, by) = a.position, b.position
    return {
        "left of": ax + margin <= bx,
        "right of": ax >= bx + margin,
        "above": ay + margin <= by,
        "below": ay >= by + margin,
    }[relation]


def _superlative_key(word: str):
    return {
        "leftmost": lambda o: o.position[0],
        "rightmost": lambda o: -o.position[0],
        "topmost": lambda o: o.position[1],
        "bottommost": lambda o: -o.position[1],
    }[word]


def referring_expressions(objects: list[ShapeObject], margin: float) -> list[Ref]:
    """Every unambiguous expression of the grammar, for every object."""
    refs: list[Ref] = []
    for obj in objects:
        for text in _attribute_phrase(obj, objects):
            refs.append(Ref(text, obj.id, "attribute"))
        for word in SUPERLATIVES:
            key = _superlative_key(word)
            for colour in (None, obj.colour):
                group = sorted((o for o in objects if _matches(o, obj.kind, colour)), key=key)
                if len(group) >= 2 and group[0] is obj and key(group[1]) - key(obj) >= margin:
                    words = [w for w in ("the", word, colour, obj.kind) if w]
                    refs.append(Ref(" ".join(words), obj.id, "superlative"))
        for anchor in objects:
            if anchor is obj:
                continue
            anchor_texts = _attribute_phrase(anchor, objects)
            if not anchor_texts:
                continue
            for relation in RELATIONS:
                if not holds(relation, obj, anchor, margin):
                    continue
                for colour in (None, obj.colour):
                    group = [o for o in objects if o is not anchor and _matches(o, obj.kind, colour)
                             and holds(relation, o, anchor, margin)]
                    # Unique, and no other object of the description sits near the boundary.
                    near = [o for o in objects if o is not anchor and o is not obj and _matches(o, obj.kind, colour)
                            and holds(relation, o, anchor, 0.0)]
                    if group == [obj] and not near:
                        words = [w for w in ("the", colour, obj.kind, relation) if w]
                        refs.append(Ref(" ".join(words) + " " + anchor_texts[0], obj.id, "relation", anchor.id))
                        break
    return refs


def shares_kind(scene: Scene, obj: ShapeObject) -> bool:
    """Whether another object of ``scene`` has ``obj``'s kind (naming the kind alone is then ambiguous)."""
    return sum(o.kind == obj.kind for o in scene.objects) > 1


def draw_expression(scene: Scene, oid: int, rng: np.random.Generator, contrast: float = 0.0,
                    shortest: float = 0.0, first: bool = False) -> Ref:
    """A referring expression of object ``oid`` for a training turn: uniform over its expressions, or
    (with probability ``contrast``) over its attribute expressions when another object of the scene
    has its kind (each names the colour or size that tells the two apart); an object's ``first`` turn
    asks for its shortest one (what a held-out item asks) with probability ``shortest``. At
    ``contrast == shortest == 0`` it makes the one uniform draw, so exports made before are unchanged.
    Why both: uniform draws need the colour or size about one draw in ten, and give ``the <kind>``
    about one in ten; models trained on them missed exactly those held-out items (the LLaVA base's
    REC, README)."""
    refs = scene.refs_for(oid)
    if first and shortest > 0 and rng.random() < shortest:
        return refs[0]
    if contrast > 0 and shares_kind(scene, scene.objects[oid]) and rng.random() < contrast:
        refs = [r for r in refs if r.type == "attribute"] or refs
    return refs[int(rng.integers(len(refs)))]


# ----------------------------------------------------------------------------------------------
# captions and questions


def caption_of(objects: list[ShapeObject]) -> tuple[str, list[CaptionPhrase]]:
    """Left-to-right listing: ``"a large red circle, a small blue square and a green triangle."``."""
    ordered = sorted(objects, key=lambda o: (o.position[0], o.position[1]))
    phrases: list[CaptionPhrase] = []
    text = ""
    for i, obj in enumerate(ordered):
        if i > 0:
            text += " and " if i == len(ordered) - 1 else ", "
        phrases.append(CaptionPhrase(obj.phrase, obj.id, len(text), len(text) + len(obj.phrase)))
        text += obj.phrase
    return text + ".", phrases


def _questions(objects: list[ShapeObject], refs: list[Ref], cfg: WorldConfig, rng: np.random.Generator,
               margin: float) -> list[QA]:
    qa: list[QA] = []
    for obj in objects:
        mine = [r for r in refs if r.target == obj.id]
        no_colour = [r for r in mine if obj.colour not in r.text.split()]
        no_size = [r for r in mine if obj.size not in r.text.split()]
        if no_colour:
            r = no_colour[int(rng.integers(len(no_colour)))]
            qa.append(QA(f"what colour is {r.text}?", obj.colour, "colour", [obj.id]))
        if no_size:
            r = no_size[int(rng.integers(len(no_size)))]
            qa.append(QA(f"what size is {r.text}?", obj.size, "size", [obj.id]))
        # Shape questions name the object without its kind: "what shape is the small red one?"
        for size in (None, obj.size):
            if sum(o.colour == obj.colour and size in (None, o.size) for o in objects) == 1:
                words = " ".join(w for w in ("the", size, obj.colour, "one") if w)
                qa.append(QA(f"what shape is {words}?", obj.kind, "shape", [obj.id]))
                break
        if obj.glyph and mine:
            qa.append(QA(f"what letter is on {mine[0].text}?", obj.glyph, "glyph", [obj.id]))
    colour = cfg.colours[int(rng.integers(len(cfg.colours)))]
    n = sum(o.colour == colour for o in objects)
    qa.append(QA(f"how many {colour} shapes are there?", NUMBER_WORDS[n], "count",
                 [o.id for o in objects if o.colour == colour]))
    kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
    n = sum(o.kind == kind for o in objects)
    qa.append(QA(f"how many {kind}s are there?", NUMBER_WORDS[n], "count", [o.id for o in objects if o.kind == kind]))
    qa.append(QA("how many shapes are there?", NUMBER_WORDS[len(objects)], "count", [o.id for o in objects]))
    # Balanced existence questions: one present pair, one absent pair when there is one.
    present = objects[int(rng.integers(len(objects)))]
    qa.append(QA(f"is there a {present.colour} {present.kind}?", "yes", "exist", [present.id]))
    absent = [(c, k) for c in cfg.colours for k in cfg.kinds
              if not any(o.colour == c and o.kind == k for o in objects)]
    if absent:
        c, k = absent[int(rng.integers(len(absent)))]
        qa.append(QA(f"is there a {c} {k}?", "no", "exist", []))
    # Spatial yes/no over uniquely named pairs whose relation is clear either way.
    attr = {o.id: [r.text for r in refs if r.target == o.id and r.type == "attribute"] for o in objects}
    pairs = [(a, b) for a, b in itertools.permutations(objects, 2) if attr[a.id] and attr[b.id]]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        if holds(rel, a, b, margin) or not holds(rel, a, b, 0.0):
            answer = "yes" if holds(rel, a, b, margin) else "no"
            qa.append(QA(f"is {attr[a.id][0]} {rel} {attr[b.id][0]}?", answer, "spatial", [a.id, b.id]))
    return qa


# ----------------------------------------------------------------------------------------------
# the world


class World:
    """A deterministic source of scenes: ``World(cfg, seed).scene("train", 7)`` never changes."""

    def __init__(self, config: WorldConfig | None = None, seed: int = 0):
        self.config = config or WorldConfig()
        self.seed = int(seed)

    def key(self) -> str:
        return f"seed={self.seed};{self.config.key()}"

    def image_id(self, split: str, index: int) -> int:
        return SPLITS[split] * 10_000_000 + index + 1

    def scene(self, split: str, index: int) -> Scene:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
        rng = np.random.default_rng([self.seed, SPLITS[split], index])
        for _ in range(self.config.max_tries):
            scene = self._try_scene(rng, split, index)
            if scene is not None:
                return scene
        raise RuntimeError(f"could not place a valid scene in {self.config.max_tries} tries; loosen {self.config}")

    def scenes(self, split: str, n: int, start: int = 0) -> list[Scene]:
        return [self.scene(split, i) for i in range(start, start + n)]

    def _try_scene(self, rng: np.random.Generator, split: str, index: int) -> Scene | None:
        cfg, size = self.config, self.config.image_size
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        specs, fulls = [], []
        for i in range(n):
            kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
            colour = cfg.colours[int(rng.integers(len(cfg.colours)))]
            sz = SIZES[int(rng.integers(len(SIZES)))]
            radius = (cfg.small_radius if sz == "small" else cfg.large_radius) * size
            lo, hi = radius + 1, size - radius - 1
            center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            glyph = None
            if cfg.glyph_prob > 0 and sz == "large" and rng.random() < cfg.glyph_prob:
                glyph = GLYPH_LETTERS[int(rng.integers(len(GLYPH_LETTERS)))]
            specs.append((i, kind, colour, sz, center, radius, glyph))
            fulls.append(shape_mask(kind, center, radius, size))
        # Later objects are drawn on top: an object's visible part is what no later object covers.
        objects: list[ShapeObject] = []
        covered = np.zeros((size, size), bool)
        for (i, kind, colour, sz, center, radius, glyph), full in reversed(list(zip(specs, fulls))):
            visible = full & ~covered
            if visible.sum() < max(cfg.min_visible_pixels, cfg.min_visible_fraction * full.sum()):
                return None
            covered |= full
            objects.append(ShapeObject(i, kind, colour, sz, center, radius, visible, glyph))
        objects.sort(key=lambda o: o.id)
        # Two identical objects (same kind, colour and size) are allowed only if a relation tells them apart.
        margin = cfg.spatial_margin * size
        refs = referring_expressions(objects, margin)
        if any(not any(r.target == o.id for r in refs) for o in objects):
            return None
        image = np.empty((size, size, 3), np.uint8)
        image[:] = cfg.background
        for obj, full in zip(objects, fulls):
            image[full] = COLOURS[obj.colour]
            if obj.glyph:
                _draw_glyph(image, obj.glyph, obj.center, obj.radius)
        if cfg.pixel_noise > 0:
            noise = rng.normal(0, cfg.pixel_noise, image.shape)
            image = np.clip(image.astype(np.float64) + noise, 0, 255).astype(np.uint8)
        caption, phrases = caption_of(objects)
        qa = _questions(objects, refs, cfg, rng, margin)
        return Scene(self.image_id(split, index), split, index, image, objects, refs, caption, phrases, qa)


def vocabulary(config: WorldConfig | None = None) -> list[str]:
    """Every word the world's texts can contain (captions, expressions, questions, answers)."""
    cfg = config or WorldConfig()
    words = {"a", "the", "and", "with", "letter", "one", "is", "there", "are", "what", "how", "many", "shapes",
             "colour", "shape", "size", "on", "yes", "no", "of", "left", "right", "above", "below"}
    words |= set(cfg.kinds) | {k + "s" for k in cfg.kinds} | set(cfg.colours) | set(SIZES)
    words |= set(SUPERLATIVES) | set(NUMBER_WORDS) | set(GLYPH_LETTERS)
    return sorted(words)
