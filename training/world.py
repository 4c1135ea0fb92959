"""A procedural captioned-image world: small RGB renders of shapes with ground-truth attributes and captions.

Three scene kinds:
  single  one object: shape, color, size (small/large), position (3x3 grid), background
  count   two or three identical small objects scattered on a background
  pair    two different objects in a relation ("a red circle to the left of a blue square", "... above ...")

Every example keeps its scene (the ground truth) and the set of attributes its caption mentions, so a judge
can score an image against exactly what the prompt asked for. Captions come from varied templates and
synonyms, which gives the semantic structure shared sampling exploits: near-paraphrases (same scene, another
template), same object with a different attribute (`vary_attribute`), and unrelated scenes.

Everything is deterministic by seed: example `i` of split `s` under seed `k` is drawn from
`np.random.default_rng([k, SPLIT_IDS[s], i])`, and rendering is a pure function of the scene.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 2
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white")
BACKGROUNDS = ("black", "gray", "white")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
COUNTS = (1, 2, 3)
RELATIONS = ("left of", "right of", "above", "below")
AXES = ("horizontal", "vertical")
KINDS = ("single", "count", "pair")
KIND_WEIGHTS = (0.55, 0.15, 0.30)
SPLIT_IDS = {"train": 0, "heldout": 1, "judge_train": 2, "judge_val": 3, "test": 4}

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 20), "gray": (120, 120, 125), "white": (235, 235, 235),
}
SIZE_RADIUS = {"small": (6.0, 8.0), "large": (12.0, 14.0)}
COUNT_RADIUS = (5.5, 7.0)
PAIR_RADIUS = (8.0, 10.0)
CELL_CENTERS = (16.0, 32.0, 48.0)
CELL_JITTER = 2.0
COLOR_JITTER = 12
BACKGROUND_JITTER = 8

# ----------------------------------------------------------------------------------------------- vocabulary
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "heart": ("heart",),
}
SHAPE_PLURALS = {"circle": "circles", "disc": "discs", "round dot": "round dots", "square": "squares",
                 "box": "boxes", "triangle": "triangles", "star": "stars", "cross": "crosses",
                 "plus sign": "plus signs", "heart": "hearts"}  # fmt: skip
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the upper left"),
    "top": ("at the top", "at the top center"),
    "top right": ("in the top right corner", "at the upper right"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the lower left"),
    "bottom": ("at the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right corner", "at the lower right"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "on top of"),
    "below": ("below", "beneath"),
}
COUNT_WORDS = {2: ("two", "a pair of"), 3: ("three", "a group of three")}
BACKGROUND_PHRASES = ("on a {bg} background", "against a {bg} background", "with a {bg} backdrop")
PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ", "there is ")

# Templates: {obj} is "a small red circle" style noun phrase; each template says which optional attributes it
# mentions. The placeholders are filled by `caption_example`.
SINGLE_TEMPLATES: tuple[tuple[str, frozenset[str]], ...] = (
    ("{a} {color} {shape}", frozenset()),
    ("{a} {size} {color} {shape}", frozenset({"size"})),
    ("{a} {color} {shape} {pos}", frozenset({"position"})),
    ("{a} {size} {color} {shape} {pos}", frozenset({"size", "position"})),
    ("{a} {color} {shape} {bgp}", frozenset({"background"})),
    ("{a} {size} {color} {shape} {pos} {bgp}", frozenset({"size", "position", "background"})),
    ("{a} {color} {shape} {pos} {bgp}", frozenset({"position", "background"})),
    ("{pos_cap}, {a} {size} {color} {shape}", frozenset({"size", "position"})),
    ("{color} {shape}, {size}, {pos_word}, {bg} background", frozenset({"size", "position", "background"})),
)
COUNT_TEMPLATES: tuple[tuple[str, frozenset[str]], ...] = (
    ("{n} {color} {shapes}", frozenset()),
    ("{n} {color} {shapes} {bgp}", frozenset({"background"})),
    ("{n} small {color} {shapes}", frozenset()),
)
PAIR_TEMPLATES: tuple[tuple[str, frozenset[str]], ...] = (
    ("{a1} {color1} {shape1} {rel} {a2} {color2} {shape2}", frozenset()),
    ("{a1} {color1} {shape1} {rel} {a2} {color2} {shape2} {bgp}", frozenset({"background"})),
)

# Oracle label spaces: attribute -> class names. Every render has a label for each of its *defined* attributes.
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "count": tuple(str(c) for c in COUNTS),
    "background": BACKGROUNDS,
    "shape2": SHAPES,
    "color2": COLORS,
    "relation": AXES,
}
DEFINED_ATTRIBUTES: dict[str, frozenset[str]] = {
    "single": frozenset({"shape", "color", "size", "position", "count", "background"}),
    "count": frozenset({"shape", "color", "count", "background"}),
    "pair": frozenset({"shape", "color", "shape2", "color2", "relation", "count", "background"}),
}
ALWAYS_MENTIONED: dict[str, frozenset[str]] = {
    "single": frozenset({"shape", "color", "count"}),
    "count": frozenset({"shape", "color", "count"}),
    "pair": frozenset({"shape", "color", "shape2", "color2", "relation"}),
}


# ----------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    """One drawn object: attribute names plus its exact geometry and color jitter."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A full scene. For `pair`, objects are (subject, reference) in caption order and `relation` is
    the subject's relation to the reference."""

    kind: str
    objects: tuple[SceneObject, ...]
    background: str
    background_rgb: tuple[int, int, int]
    position: str | None = None
    relation: str | None = None

    def canonical_pair(self) -> tuple[SceneObject, SceneObject]:
        """Pair objects ordered left-to-right (horizontal) or top-to-bottom (vertical)."""
        if self.kind != "pair":
            raise ValueError(f"canonical_pair needs a pair scene, got {self.kind!r}")
        subj, ref = self.objects
        return (subj, ref) if self.relation in ("left of", "above") else (ref, subj)

    def attributes(self) -> dict[str, str]:
        """Ground-truth labels of every attribute defined for this scene kind (see DEFINED_ATTRIBUTES)."""
        first = self.objects[0]
        out = {"count": str(len(self.objects)), "background": self.background}
        if self.kind == "pair":
            a, b = self.canonical_pair()
            out |= {"shape": a.shape, "color": a.color, "shape2": b.shape, "color2": b.color}
            out["relation"] = "horizontal" if self.relation in ("left of", "right of") else "vertical"
        else:
            out |= {"shape": first.shape, "color": first.color}
        if self.kind == "single":
            out |= {"size": first.size, "position": str(self.position)}
        return out


@dataclass(frozen=True)
class Example:
    """A scene with one caption and the attributes that caption mentions."""

    scene: Scene
    caption: str
    mentioned: frozenset[str]

    def prompt_labels(self) -> dict[str, str]:
        """The labels the prompt asks for: ground truth restricted to mentioned attributes."""
        attrs = self.scene.attributes()
        return {k: attrs[k] for k in sorted(self.mentioned)}


def _jitter_rgb(rgb: tuple[int, int, int], amount: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Uniform per-channel jitter, clipped to [0, 255]."""
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + d, 0, 255))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, options: Sequence):
    """One uniformly chosen element (keeps the option's own type)."""
    return options[int(rng.integers(len(options)))]


def _object_color(rng: np.random.Generator, background: str, exclude: Sequence[str] = ()) -> str:
    """An object color that differs from the background name and from `exclude`."""
    options = [c for c in COLORS if c != background and c not in exclude]
    return _pick(rng, options)


def _make_object(shape: str, color: str, size: str, cx: float, cy: float, radius: float,
                 rng: np.random.Generator) -> SceneObject:
    """A SceneObject with jittered color."""
    return SceneObject(shape, color, size, float(cx), float(cy), float(radius),
                       _jitter_rgb(COLOR_RGB[color], COLOR_JITTER, rng))


def _cell_center(position: str, rng: np.random.Generator) -> tuple[float, float]:
    """Jittered pixel center of a 3x3 grid cell."""
    idx = POSITIONS.index(position)
    cy, cx = CELL_CENTERS[idx // 3], CELL_CENTERS[idx % 3]
    jx, jy = rng.uniform(-CELL_JITTER, CELL_JITTER, size=2)
    return cx + jx, cy + jy


def sample_single(rng: np.random.Generator, **fixed: str) -> Scene:
    """A one-object scene; keyword arguments (shape=, color=, size=, position=, background=) pin attributes."""
    background = fixed.get("background") or _pick(rng, BACKGROUNDS)
    shape = fixed.get("shape") or _pick(rng, SHAPES)
    color = fixed.get("color") or _object_color(rng, background)
    if color == background:
        raise ValueError(f"object color {color!r} equals the background")
    size = fixed.get("size") or _pick(rng, SIZES)
    position = fixed.get("position") or _pick(rng, POSITIONS)
    cx, cy = _cell_center(position, rng)
    radius = rng.uniform(*SIZE_RADIUS[size])
    obj = _make_object(shape, color, size, cx, cy, radius, rng)
    bg_rgb = _jitter_rgb(BACKGROUND_RGB[background], BACKGROUND_JITTER, rng)
    return Scene("single", (obj,), background, bg_rgb, position=position)


def sample_count(rng: np.random.Generator, count: int | None = None, **fixed: str) -> Scene:
    """Two or three identical small objects at non-overlapping random places."""
    count = count or int(_pick(rng, (2, 3)))
    if count not in (2, 3):
        raise ValueError(f"count must be 2 or 3, got {count}")
    background = fixed.get("background") or _pick(rng, BACKGROUNDS)
    shape = fixed.get("shape") or _pick(rng, SHAPES)
    color = fixed.get("color") or _object_color(rng, background)
    radius = rng.uniform(*COUNT_RADIUS)
    centers: list[tuple[float, float]] = []
    while len(centers) < count:
        c = tuple(rng.uniform(radius + 3, IMAGE_SIZE - radius - 3, size=2))
        if all(math.dist(c, o) > 2 * radius + 5 for o in centers):
            centers.append(c)  # type: ignore[arg-type]
    objs = tuple(_make_object(shape, color, "small", x, y, radius, rng) for x, y in centers)
    bg_rgb = _jitter_rgb(BACKGROUND_RGB[background], BACKGROUND_JITTER, rng)
    return Scene("count", objs, background, bg_rgb)


def sample_pair(rng: np.random.Generator, **fixed: str) -> Scene:
    """Two objects that differ in shape or color, related left/right/above/below."""
    background = fixed.get("background") or _pick(rng, BACKGROUNDS)
    relation = fixed.get("relation") or _pick(rng, RELATIONS)
    shape1 = fixed.get("shape") or _pick(rng, SHAPES)
    color1 = fixed.get("color") or _object_color(rng, background)
    shape2 = fixed.get("shape2") or _pick(rng, SHAPES)
    color2 = fixed.get("color2") or _object_color(rng, background, exclude=(color1,) if shape2 == shape1 else ())
    if (shape1, color1) == (shape2, color2):
        raise ValueError("pair objects must differ in shape or color")
    r1, r2 = rng.uniform(*PAIR_RADIUS, size=2)
    # canonical first/second along the axis, a shared cross-axis coordinate with small jitter
    lo, hi = rng.uniform(13, 24), rng.uniform(40, 51)
    cross = rng.uniform(18, 46)
    j1, j2 = rng.uniform(-3, 3, size=2)
    first_is_subject = relation in ("left of", "above")
    p_first, p_second = (lo, cross + j1), (hi, cross + j2)
    if relation in ("above", "below"):
        p_first, p_second = p_first[::-1], p_second[::-1]
    p_subj, p_ref = (p_first, p_second) if first_is_subject else (p_second, p_first)
    subj = _make_object(shape1, color1, "medium", p_subj[0], p_subj[1], r1, rng)
    ref = _make_object(shape2, color2, "medium", p_ref[0], p_ref[1], r2, rng)
    bg_rgb = _jitter_rgb(BACKGROUND_RGB[background], BACKGROUND_JITTER, rng)
    return Scene("pair", (subj, ref), background, bg_rgb, relation=relation)


def kind_probabilities(weights: Sequence[float]) -> tuple[float, float, float]:
    """Scene-kind weights (single, count, pair) normalised to probabilities; ValueError unless they are three
    finite non-negative numbers with a positive sum."""
    ok = isinstance(weights, (list, tuple)) and len(weights) == len(KINDS) and all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights)
    if not ok or sum(weights) <= 0:
        raise ValueError(f"kind weights must be {len(KINDS)} non-negative numbers for {KINDS} with a positive sum, "
                         f"got {weights!r}")
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def sample_scene(rng: np.random.Generator, kind: str | None = None,
                 weights: Sequence[float] = KIND_WEIGHTS) -> Scene:
    """A random scene of the given kind (or of a kind drawn with `weights`, probabilities over KINDS)."""
    kind = kind or str(rng.choice(KINDS, p=weights))
    if kind == "single":
        return sample_single(rng)
    if kind == "count":
        return sample_count(rng)
    if kind == "pair":
        return sample_pair(rng)
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------------------------- captions
_ARTICLE_RE = re.compile(r"(^|\s)a ([aeiou])")


def caption_scene(scene: Scene, rng: np.random.Generator, template: int | None = None) -> tuple[str, frozenset[str]]:
    """A caption for the scene from a random (or the given) template; returns (caption, mentioned attributes)."""
    prefix = _pick(rng, PREFIXES)
    bg = scene.background
    bgp = _pick(rng, BACKGROUND_PHRASES).format(bg=bg)
    if scene.kind == "single":
        obj = scene.objects[0]
        text, extra = SINGLE_TEMPLATES[template if template is not None else int(rng.integers(len(SINGLE_TEMPLATES)))]
        words = {"size": _pick(rng, SIZE_WORDS[obj.size]), "color": obj.color,
                 "shape": _pick(rng, SHAPE_WORDS[obj.shape]), "bg": bg, "bgp": bgp,
                 "pos": _pick(rng, POSITION_PHRASES[str(scene.position)]), "pos_word": str(scene.position)}
        words["a"] = "a"
        words["pos_cap"] = words["pos"]
        if text.startswith("{pos_cap}") or text.startswith("{color}"):
            prefix = ""
        body = text.format(**words)
    elif scene.kind == "count":
        obj = scene.objects[0]
        text, extra = COUNT_TEMPLATES[template if template is not None else int(rng.integers(len(COUNT_TEMPLATES)))]
        n_word = _pick(rng, COUNT_WORDS[len(scene.objects)])
        body = text.format(n=n_word, color=obj.color,
                           shapes=SHAPE_PLURALS[_pick(rng, SHAPE_WORDS[obj.shape])], bgp=bgp)
        if prefix == "there is " and not n_word.startswith("a "):
            prefix = "there are "
    elif scene.kind == "pair":
        subj, ref = scene.objects
        text, extra = PAIR_TEMPLATES[template if template is not None else int(rng.integers(len(PAIR_TEMPLATES)))]
        body = text.format(a1="a", color1=subj.color, shape1=_pick(rng, SHAPE_WORDS[subj.shape]),
                           rel=_pick(rng, RELATION_PHRASES[str(scene.relation)]), a2="a",
                           color2=ref.color, shape2=_pick(rng, SHAPE_WORDS[ref.shape]), bgp=bgp)
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    caption = _ARTICLE_RE.sub(r"\1an \2", (prefix + body).replace("  ", " ").strip())
    return caption, ALWAYS_MENTIONED[scene.kind] | extra


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split` under `seed` (independent streams per example)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def make_example(seed: int, split: str, index: int, kind_weights: Sequence[float] | None = None) -> Example:
    """Example `index` of a split: a scene and one caption, deterministic by (seed, split, index) and the kind
    weights (None: KIND_WEIGHTS, the world's own mix)."""
    rng = example_rng(seed, split, index)
    scene = sample_scene(rng, weights=KIND_WEIGHTS if kind_weights is None else kind_probabilities(kind_weights))
    caption, mentioned = caption_scene(scene, rng)
    return Example(scene, caption, mentioned)


def make_examples(n: int, seed: int = 0, split: str = "train", start: int = 0,
                  kind_weights: Sequence[float] | None = None) -> list[Example]:
    """Examples start..start+n-1 of a split, scene kinds drawn with `kind_weights` (None: KIND_WEIGHTS)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_example(seed, split, i, kind_weights) for i in range(start, start + n)]


# ----------------------------------------------------------------------------------------------- semantics
def paraphrase(example: Example, rng: np.random.Generator) -> Example:
    """Same scene, a fresh caption that mentions the same attributes (a near-paraphrase)."""
    templates = {"single": SINGLE_TEMPLATES, "count": COUNT_TEMPLATES, "pair": PAIR_TEMPLATES}[example.scene.kind]
    same = [i for i, (_, extra) in enumerate(templates) if ALWAYS_MENTIONED[example.scene.kind] | extra
            == example.mentioned]
    caption, mentioned = caption_scene(example.scene, rng, template=_pick(rng, same) if same else None)
    return Example(example.scene, caption, mentioned)


def vary_attribute(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    """The same scene with one attribute changed (e.g. same object, a different color)."""
    if scene.kind != "single":
        if attribute == "color":
            objs = scene.objects
            new = _object_color(rng, scene.background, exclude=(objs[0].color,))
            changed = replace(objs[0], color=new, rgb=_jitter_rgb(COLOR_RGB[new], COLOR_JITTER, rng))
            rest = objs[1:]
            if scene.kind == "count":
                rest = tuple(replace(o, color=new, rgb=changed.rgb) for o in rest)
            if scene.kind == "pair" and (changed.shape, changed.color) == (objs[1].shape, objs[1].color):
                return vary_attribute(scene, attribute, rng)
            return replace(scene, objects=(changed, *rest))
        raise ValueError(f"vary_attribute supports only 'color' for {scene.kind} scenes, got {attribute!r}")
    obj = scene.objects[0]
    pins = {"shape": obj.shape, "color": obj.color, "size": obj.size, "position": str(scene.position),
            "background": scene.background}
    if attribute not in pins:
        raise ValueError(f"cannot vary {attribute!r}; expected one of {sorted(pins)}")
    options = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}
    choices = [v for v in options[attribute] if v != pins[attribute]]
    if attribute == "color":
        choices = [c for c in choices if c != scene.background]
    if attribute == "background":
        choices = [b for b in choices if b != obj.color]
    pins[attribute] = _pick(rng, choices)
    return sample_single(rng, **pins)


def resample_for_caption(example: Example, rng: np.random.Generator) -> Example:
    """Another scene that matches the same caption: mentioned attributes kept, the rest drawn afresh."""
    scene, m = example.scene, example.mentioned
    if scene.kind == "single":
        obj = scene.objects[0]
        pins = {"shape": obj.shape, "color": obj.color, "size": obj.size if "size" in m else None,
                "position": scene.position if "position" in m else None,
                "background": scene.background if "background" in m else None}
        if pins["background"] is None:
            pins["background"] = _pick(rng, [b for b in BACKGROUNDS if b != obj.color])
        new = sample_single(rng, **{k: v for k, v in pins.items() if v})
    elif scene.kind == "count":
        obj = scene.objects[0]
        bg = scene.background if "background" in m else _pick(rng, [b for b in BACKGROUNDS if b != obj.color])
        new = sample_count(rng, count=len(scene.objects), shape=obj.shape, color=obj.color, background=bg)
    elif scene.kind == "pair":
        subj, ref = scene.objects
        bg = scene.background if "background" in m else _pick(
            rng, [b for b in BACKGROUNDS if b not in (subj.color, ref.color)])
        new = sample_pair(rng, shape=subj.shape, color=subj.color, shape2=ref.shape, color2=ref.color,
                          relation=str(scene.relation), background=bg)
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    return Example(new, example.caption, example.mentioned)


# ----------------------------------------------------------------------------------------------- rendering
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of radius r centered at (cx, cy) (circle handled by the caller)."""
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        yc = cy + 0.15 * r
        return [(cx + r * math.cos(a), yc + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.08 * r + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.34 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        s = r / 16.5
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
        return [(cx + s * x, cy - s * (y + 2.5)) for x, y in zip(xs, ys, strict=True)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as a (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB array (anti-aliased by supersampling)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), scene.background_rgb)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, r = obj.cx * s, obj.cy * s, obj.radius * s
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.rgb)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=obj.rgb)
    if s > 1:
        img = img.reduce(s)
    return np.asarray(img, dtype=np.uint8)


def render_examples(examples: Sequence[Example | Scene]) -> np.ndarray:
    """A (N, IMAGE_SIZE, IMAGE_SIZE, 3) uint8 batch of renders."""
    scenes = [e.scene if isinstance(e, Example) else e for e in examples]
    if not scenes:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.stack([render_scene(s) for s in scenes])


def label_arrays(examples: Sequence[Example], mentioned_only: bool = False) -> dict[str, np.ndarray]:
    """Per-attribute int64 label arrays (-1 where the attribute is undefined, or unmentioned if asked)."""
    out = {k: np.full(len(examples), -1, dtype=np.int64) for k in ATTRIBUTE_CLASSES}
    for i, ex in enumerate(examples):
        labels = ex.prompt_labels() if mentioned_only else ex.scene.attributes()
        for k, v in labels.items():
            out[k][i] = ATTRIBUTE_CLASSES[k].index(v)
    return out


def build_dataset(n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, list[str], list[Example]]:
    """n examples of a split rendered: (uint8 images, captions, examples)."""
    examples = make_examples(n, seed, split)
    return render_examples(examples), [e.caption for e in examples], examples
