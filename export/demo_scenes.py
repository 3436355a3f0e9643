"""Generated scenes for the demo model: coloured, textured shapes with referring expressions.

A scene is a background (flat, gradient, noisy or checkered, in muted colours) with 2-5
non-overlapping shapes (circle, square, triangle, star), each in one of seven colours and one of
three textures (solid, striped, dotted).  Every object's mask is the exact set of pixels it was
drawn on, so ground truth is exact.  `expressions` lists, per expression type, every expression
that names exactly one target in the scene:

* colour    "the red ball", "blue square"                  colour + shape, unique
* texture   "the striped square", "the dotted green star"  texture (+ colour) + shape, unique
* shape     "the triangle"                                  the only one of its shape
* position  "the leftmost circle", "the square at the top"  extreme of >= 2 of a kind, by a margin
* relation  "the blue square left of the circle"            of >= 2 alike, the one left/right of, above/below a unique reference
* size      "the biggest triangle", "the smallest star"     of >= 2 of a shape, area ratio >= SIZE_RATIO
* semantic  "[semantic] background", "[semantic] circles"   a region or all objects of a kind (upstream's `[semantic] ` prefix)

Everything is drawn from a `numpy.random.Generator`, so a seed fixes a scene and its expressions.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

SEMANTIC_TOKEN = "[semantic]"

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (45, 165, 65),
    "blue": (40, 85, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
    "white": (240, 240, 240),
}
COLOUR_JITTER = 18  # +- per channel
SHAPES = ("circle", "square", "triangle", "star")
SHAPE_WORDS = {"circle": ("circle", "ball"), "square": ("square",), "triangle": ("triangle",), "star": ("star",)}
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
TEXTURES = ("solid", "striped", "dotted")
BACKGROUNDS = ("flat", "gradient", "noise", "checkered")

IMAGE_SIDE_RANGE = (256, 448)  # width and height drawn independently
OBJECT_COUNT_RANGE = (2, 4)
RADIUS_RANGE = (0.11, 0.22)  # circumradius, as a fraction of the image's shorter side
GAP = 0.03  # minimum free space between two objects' circumcircles, fraction of the shorter side
PLACEMENT_TRIES = 200
POSITION_MARGIN = 0.1  # fraction of the image side between the extreme object and the next
RELATION_MARGIN = 0.05
SIZE_RATIO = 1.6
PATTERN_PERIOD_RANGE = (0.025, 0.05)  # stripe / dot period, fraction of the shorter side
NOISE_SIGMA_RANGE = (0.0, 6.0)

EXPRESSION_TYPES = ("colour", "texture", "shape", "position", "relation", "size", "semantic")

RELATIONS = {
    "left of": lambda t, r, m: t.cx < r.cx - m,
    "right of": lambda t, r, m: t.cx > r.cx + m,
    "above": lambda t, r, m: t.cy < r.cy - m,
    "below": lambda t, r, m: t.cy > r.cy + m,
}
RELATION_OPPOSITES = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
EXTREMES = {  # name: (key to minimise, phrasings)
    "left": (lambda o: o.cx, ("the {d} on the left", "the leftmost {d}")),
    "right": (lambda o: -o.cx, ("the {d} on the right", "the rightmost {d}")),
    "top": (lambda o: o.cy, ("the top {d}", "the {d} at the top")),
    "bottom": (lambda o: -o.cy, ("the bottom {d}", "the {d} at the bottom")),
}


@dataclass
class SceneObject:
    shape: str
    colour: str
    texture: str
    cx: float
    cy: float
    radius: float
    mask: np.ndarray  # bool [H, W]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Scene:
    rgb: np.ndarray  # uint8 [H, W, 3]
    objects: List[SceneObject]

    @property
    def size(self) -> Tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


@dataclass(frozen=True, eq=False)
class Expression:
    text: str
    kind: str  # one of EXPRESSION_TYPES
    mask: np.ndarray  # uint8 0/1 [H, W]
    target: Optional[SceneObject]  # the one object referred to; None for a region (semantic)


# ----------------------------------------------------------------------------------------- drawing


def random_scene(rng: np.random.Generator, rotation: float = 1.0) -> Scene:
    """`rotation` < 1 (diagnostics only, `export.patch_probe`): shapes tilt at most `rotation` x 180
    degrees from upright (apex up, square axis-aligned); at 1 any angle, the scenes the demo trains on."""
    height, width = (int(rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1)) for _ in range(2))
    rgb = _background(rng, height, width)
    objects = _place_objects(rng, height, width, rotation)
    for obj in objects:
        _paint(rng, rgb, obj, min(height, width))
    sigma = rng.uniform(*NOISE_SIGMA_RANGE)
    noisy = rgb.astype(np.float32) + rng.normal(0.0, sigma, rgb.shape).astype(np.float32)
    return Scene(np.clip(np.round(noisy), 0, 255).astype(np.uint8), objects)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A grey with a faint tint: never confusable with the object colours."""
    level = rng.uniform(45, 175)
    return np.clip(level + rng.uniform(-14, 14, 3), 0, 255)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = _muted_colour(rng)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = base
    if kind == "gradient":
        other = _muted_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xx * np.cos(angle) + yy * np.sin(angle))
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        canvas = base * (1 - ramp[..., None]) + other * ramp[..., None]
    elif kind == "noise":
        coarse = rng.normal(0, 20, (max(height // 24, 2), max(width // 24, 2))).astype(np.float32)
        canvas = canvas + cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)[..., None]
    elif kind == "checkered":
        cell = int(rng.integers(16, 48))
        yy, xx = np.mgrid[0:height, 0:width]
        checks = ((yy // cell + xx // cell) % 2).astype(np.float32)
        canvas = canvas + checks[..., None] * rng.uniform(-25, 25)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _place_objects(rng: np.random.Generator, height: int, width: int, rotation: float = 1.0) -> List[SceneObject]:
    short = min(height, width)
    count = int(rng.integers(OBJECT_COUNT_RANGE[0], OBJECT_COUNT_RANGE[1] + 1))
    # Scenes repeat shapes and colours often, so that position, relation and size expressions apply.
    shape_pool = rng.choice(SHAPES, size=int(rng.integers(1, len(SHAPES) + 1)), replace=False)
    colour_pool = rng.choice(list(COLOURS), size=int(rng.integers(2, len(COLOURS) + 1)), replace=False)
    objects: List[SceneObject] = []
    for _ in range(PLACEMENT_TRIES):
        if len(objects) == count:
            break
        radius = rng.uniform(*RADIUS_RANGE) * short
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        if any(np.hypot(cx - o.cx, cy - o.cy) < radius + o.radius + GAP * short for o in objects):
            continue
        shape = str(rng.choice(shape_pool))
        angle = rng.uniform(0, 2 * np.pi)  # drawn whatever `rotation`: the same seed places the same objects
        if rotation < 1:
            angle = UPRIGHT_ANGLES[shape] + rotation * (angle - np.pi)
        mask = _shape_mask(shape, cx, cy, radius, angle, height, width)
        objects.append(SceneObject(shape, str(rng.choice(colour_pool)), str(rng.choice(TEXTURES)), cx, cy, radius, mask))
    return objects


UPRIGHT_ANGLES = {"circle": 0.0, "square": 0.0, "triangle": -np.pi / 2, "star": -np.pi / 2}  # apex up (y grows down)


def _shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, height: int, width: int) -> np.ndarray:
    if shape == "circle":
        mask = np.zeros((height, width), dtype=bool)
        rows, cols = _box(cx, cy, radius, height, width)
        yy, xx = np.mgrid[rows, cols]
        mask[rows, cols] = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2
        return mask
    if shape == "square":
        angles = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, radius)
    elif shape == "triangle":
        angles = angle + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, radius)
    elif shape == "star":
        angles = angle + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _box(cx: float, cy: float, radius: float, height: int, width: int) -> Tuple[slice, slice]:
    """The rows and columns that hold everything within `radius` of the centre."""
    rows = slice(max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, height))
    cols = slice(max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, width))
    return rows, cols


def _paint(rng: np.random.Generator, rgb: np.ndarray, obj: SceneObject, short: int) -> None:
    colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    rows, cols = _box(obj.cx, obj.cy, obj.radius, *obj.mask.shape)
    yy, xx = np.mgrid[rows, cols].astype(np.float32)
    period = rng.uniform(*PATTERN_PERIOD_RANGE) * short
    pixels = np.empty(yy.shape + (3,), dtype=np.float32)
    pixels[:] = colour
    if obj.texture == "striped":
        angle = rng.uniform(0, np.pi)
        phase = np.mod(xx * np.cos(angle) + yy * np.sin(angle), period) < period / 2
        pixels[phase] = colour * 0.4
    elif obj.texture == "dotted":
        dots = (np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2 < (0.28 * period) ** 2
        light = obj.colour in ("white", "yellow")
        pixels[dots] = colour * 0.35 if light else colour * 0.3 + 255 * 0.7
    inside = obj.mask[rows, cols]
    rgb[rows, cols][inside] = pixels[inside].astype(np.uint8)


# ------------------------------------------------------------------------------------- expressions


def expressions(scene: Scene, rng: np.random.Generator) -> Dict[str, List[Expression]]:
    """Every unambiguous expression of the scene, by type (types with none are absent)."""
    found: Dict[str, List[Expression]] = {}
    for kind, text, targets in _candidates(scene, rng):
        mask = np.zeros(scene.size, dtype=np.uint8)
        for target in targets:
            mask |= target.mask
        if kind == "semantic" and text == f"{SEMANTIC_TOKEN} background":
            mask = 1 - mask
        found.setdefault(kind, []).append(Expression(text, kind, mask, targets[0] if kind != "semantic" else None))
    return found


def _candidates(scene: Scene, rng: np.random.Generator):
    height, width = scene.size
    objects = scene.objects
    word = lambda shape: str(rng.choice(SHAPE_WORDS[shape]))  # noqa: E731
    article = lambda: "the " if rng.random() < 0.8 else ""  # noqa: E731
    for obj in objects:
        if _count(objects, shape=obj.shape, colour=obj.colour) == 1:
            yield "colour", f"{article()}{obj.colour} {word(obj.shape)}", [obj]
        if _count(objects, shape=obj.shape, texture=obj.texture) == 1:
            yield "texture", f"{article()}{obj.texture} {word(obj.shape)}", [obj]
        elif _count(objects, shape=obj.shape, texture=obj.texture, colour=obj.colour) == 1:
            yield "texture", f"{article()}{obj.texture} {obj.colour} {word(obj.shape)}", [obj]
        if _count(objects, shape=obj.shape) == 1:
            yield "shape", f"{article()}{word(obj.shape)}", [obj]
    yield from _position_expressions(objects, height, width, rng, word)
    yield from _relation_expressions(objects, min(height, width), rng, word)
    yield from _size_expressions(objects, rng, word)
    yield "semantic", f"{SEMANTIC_TOKEN} background", objects
    yield "semantic", f"{SEMANTIC_TOKEN} shapes", objects
    for shape in sorted({o.shape for o in objects}):
        yield "semantic", f"{SEMANTIC_TOKEN} {SHAPE_PLURALS[shape]}", [o for o in objects if o.shape == shape]


def _count(objects: Sequence[SceneObject], **attributes) -> int:
    return sum(all(getattr(o, k) == v for k, v in attributes.items()) for o in objects)


def _groups(objects: Sequence[SceneObject], rng, word):
    """(description, members) for every shape and colour+shape with at least two members."""
    for shape in sorted({o.shape for o in objects}):
        members = [o for o in objects if o.shape == shape]
        if len(members) >= 2:
            yield word(shape), members
        for colour in sorted({o.colour for o in members}):
            same = [o for o in members if o.colour == colour]
            if len(same) >= 2:
                yield f"{colour} {word(shape)}", same


def _position_expressions(objects, height, width, rng, word):
    for description, members in _groups(objects, rng, word):
        for name, (key, phrasings) in EXTREMES.items():
            ordered = sorted(members, key=key)
            side = width if name in ("left", "right") else height
            if abs(key(ordered[1]) - key(ordered[0])) >= POSITION_MARGIN * side:
                yield "position", str(rng.choice(phrasings)).format(d=description), [ordered[0]]


def _relation_expressions(objects, short, rng, word):
    margin = RELATION_MARGIN * short
    for description, members in _groups(objects, rng, word):
        for reference in objects:
            if reference in members:
                continue
            reference_text = _unique_description(objects, reference, rng, word)
            if reference_text is None:
                continue
            for relation, holds in RELATIONS.items():
                satisfied = [m for m in members if holds(m, reference, margin)]
                opposite = RELATIONS[RELATION_OPPOSITES[relation]]
                others_clear = all(opposite(m, reference, margin) for m in members if m not in satisfied)
                if len(satisfied) == 1 and others_clear:
                    yield "relation", f"the {description} {relation} the {reference_text}", satisfied


def _unique_description(objects, obj, rng, word):
    if _count(objects, shape=obj.shape) == 1:
        return word(obj.shape)
    if _count(objects, shape=obj.shape, colour=obj.colour) == 1:
        return f"{obj.colour} {word(obj.shape)}"
    return None


def _size_expressions(objects, rng, word):
    for shape in sorted({o.shape for o in objects}):
        members = sorted((o for o in objects if o.shape == shape), key=lambda o: o.area)
        if len(members) < 2:
            continue
        if members[-1].area >= SIZE_RATIO * members[-2].area:
            yield "size", f"the {rng.choice(('biggest', 'largest'))} {word(shape)}", [members[-1]]
        if members[1].area >= SIZE_RATIO * members[0].area:
            yield "size", f"the smallest {word(shape)}", [members[0]]


# ------------------------------------------------------------------------------ encoding, samples


def encode_image(rgb: np.ndarray, fmt: str = "PNG", quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def vocabulary_corpus(scenes: int = 400, lines: int = 4000, seed: int = 12345) -> List[str]:
    """Text for the demo tokenizer: random sequences of the words of generated expressions, drawn
    by frequency.  (Trained on the templated expressions themselves, sentencepiece's unigram trainer
    keeps few whole words: it seeds pieces from substrings seen in varied contexts.)"""
    rng = np.random.default_rng(seed)
    words = []
    for _ in range(scenes):
        for found in expressions(random_scene(rng), rng).values():
            words.extend(w for e in found for w in e.text.split() if w != SEMANTIC_TOKEN)
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 10)))) for _ in range(lines)]


# Training's mix of expression types: the attribute types (resolved by what an object looks like) most,
# since they teach the decoder to tell objects apart, which the other types then build on.
TRAINING_TYPE_WEIGHTS = {"colour": 3.0, "texture": 2.0, "shape": 2.0, "position": 1.0, "relation": 1.0,
                         "size": 1.0, "semantic": 1.0}


def pick_expressions(found: Dict[str, List[Expression]], count: int, rng: np.random.Generator) -> List[Expression]:
    """`count` expressions, each of a type drawn by TRAINING_TYPE_WEIGHTS among the scene's types, each
    a different one of its type while the type has unused ones."""
    kinds = sorted(found, key=EXPRESSION_TYPES.index)
    weights = np.array([TRAINING_TYPE_WEIGHTS[kind] for kind in kinds])
    unused = {kind: list(rng.permutation(len(found[kind]))) for kind in kinds}
    chosen = []
    for kind in rng.choice(kinds, size=count, p=weights / weights.sum()):
        index = unused[kind].pop() if unused[kind] else rng.integers(len(found[kind]))
        chosen.append(found[kind][index])
    return chosen


@dataclass(frozen=True)
class HeldOutScene:
    image: bytes  # JPEG, as a client would send it
    height: int
    width: int
    expressions: Tuple[Expression, ...]  # one of each type the scene has


HELD_OUT_SEED = 20261121
HELD_OUT_JPEG_QUALITY = 90


def held_out_scenes(count: int, seed: int = HELD_OUT_SEED) -> List[HeldOutScene]:
    """Scenes never seen in training (training draws from other seeds), one expression per type."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = random_scene(rng)
        found = expressions(scene, rng)
        chosen = tuple(found[kind][rng.integers(len(found[kind]))] for kind in EXPRESSION_TYPES if kind in found)
        data = encode_image(scene.rgb, "JPEG", HELD_OUT_JPEG_QUALITY)
        out.append(HeldOutScene(data, scene.size[0], scene.size[1], chosen))
    return out


DEMO_SEED = 7
DEMO_PROMPT = "the red triangle"


def demo_sample(seed: int = DEMO_SEED, prompt: str = DEMO_PROMPT) -> Tuple[np.ndarray, Expression]:
    """`make demo`'s scene (assets/demo_scene.png) and its prompt's ground truth."""
    rng = np.random.default_rng([seed, 3])  # training and held-out scenes draw from other seeds
    scene = random_scene(rng)
    for found in expressions(scene, rng).values():
        for expression in found:
            if expression.text == prompt:
                return scene.rgb, expression
    raise ValueError(f"the scene of seed {seed} has no expression {prompt!r}")


def main(argv=None) -> int:
    """python -m export.demo_scenes ASSETS_DIR: write demo_scene.png and its prompt's mask,
    ground_truth/demo_scene.png (a folder of its own: the page lists every image directly in assets)."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m export.demo_scenes", description=main.__doc__)
    parser.add_argument("assets_dir", type=Path)
    args = parser.parse_args(argv)
    rgb, expression = demo_sample()
    Image.fromarray(rgb).save(args.assets_dir / "demo_scene.png", optimize=True)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", expression.text)  # serving.demo scores the served mask only for this prompt
    (args.assets_dir / "ground_truth").mkdir(exist_ok=True)
    truth = args.assets_dir / "ground_truth" / "demo_scene.png"
    Image.fromarray(expression.mask * 255).save(truth, optimize=True, pnginfo=info)
    print(f"wrote {args.assets_dir}/demo_scene.png and {truth} (prompt {expression.text!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
