"""Built-in procedural scenes: coloured shapes with captions, questions and boxes, deterministic by seed.

Every scene has 1 to 4 objects (6 colours x 4 shapes x 2 sizes, no two of the same colour and shape,
apart enough that "left of" is never ambiguous), five reference captions in different phrasings that
name the objects from left to right with a spatial relation, questions of six kinds (colour, shape,
size, count, existence, spatial: which side of the image an object is on) with answers, and each
object's naming phrase and box. `make_scene` also makes the relational family (`vlm.data.relational`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from vlm.data.boxes import PixelBox
from vlm.data.records import Question
from vlm.errors import VLMError

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": 0.17, "large": 0.29}  # object side as a share of the image side
BACKGROUND = (120, 120, 120)
SUPERSAMPLE = 4  # draw large, then downsample: smooth edges at small sizes
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = {"train": 0, "val": 1}
MIN_IMAGE_SIZE = 16  # pixels: below 10, four objects 2 pixels apart find no room and placing them never ends
FAMILIES = ("shapes", "relational", "mixed")
"""Scene families (`DataConfig.scenes`, `make_scene`'s family)."""


@dataclass
class SceneObject:
    color: str
    shape: str
    size: str
    box: PixelBox

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def center_x(self) -> float:
        return self.box[0] + self.box[2] / 2


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    """Sorted left to right."""
    captions: list[str]
    questions: list[Question] = field(default_factory=list)


def _place(rng: np.random.Generator, n: int, image_size: int) -> list[tuple[str, tuple[float, ...]]]:
    """Sizes and non-overlapping boxes for n objects whose centres differ clearly in x."""
    min_dx = 0.1 * image_size
    while True:
        placed: list[tuple[str, tuple[float, ...]]] = []
        for _ in range(200):
            size = str(rng.choice(list(SIZES)))
            side = SIZES[size] * image_size
            x, y = rng.uniform(1, image_size - side - 1, size=2)
            box = (float(x), float(y), side, side)
            cx = x + side / 2
            if all(
                abs(cx - (b[0] + b[2] / 2)) >= min_dx
                and (x + side + 2 <= b[0] or b[0] + b[2] + 2 <= x or y + side + 2 <= b[1] or b[1] + b[3] + 2 <= y)
                for _, b in placed
            ):
                placed.append((size, box))
                if len(placed) == n:
                    return placed
        # crowded: start again


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: int) -> None:
    x, y, w, h = (v * scale for v in obj.box)
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x, y, x + w, y + h), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x, y, x + w, y + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x + w / 2, y), (x + w, y + h), (x, y + h)], fill=fill)
    else:  # cross: two bars of a third of the side
        t = w / 3
        draw.rectangle((x + t, y, x + 2 * t, y + h), fill=fill)
        draw.rectangle((x, y + t, x + w, y + 2 * t), fill=fill)


def _listing(objects: list[SceneObject]) -> str:
    names = [f"a {o.phrase}" for o in objects]  # phrases start with the size: never "an"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def captions_for(objects: list[SceneObject]) -> list[str]:
    """Five reference captions in different phrasings, naming the objects from left to right."""
    k = len(objects)
    a = objects[0].phrase
    if k == 1:
        return [f"a {a}", f"there is a {a}", f"a single {a}", f"one {a} on a gray background",
                f"the image shows a {a}"]
    b = objects[1].phrase
    if k == 2:
        return [f"a {a} to the left of a {b}", f"a {b} to the right of a {a}", f"a {a} and a {b} on its right",
                f"there is a {a} left of a {b}", f"two objects, a {a} and a {b}"]
    listing, last = _listing(objects), objects[-1].phrase
    return [f"{listing} from left to right", f"from left to right, {listing}",
            f"there are {NUMBER_WORDS[k]} objects, {listing}", f"a {a} to the left of a {b}",
            f"a {last} to the right of {_listing(objects[:-1])}"]


def _unique_name(o: SceneObject, objects: list[SceneObject]) -> str | None:
    """The shortest name of o that does not give away its colour: its shape, or size and shape."""
    if sum(p.shape == o.shape for p in objects) == 1:
        return o.shape
    if sum(p.shape == o.shape and p.size == o.size for p in objects) == 1:
        return f"{o.size} {o.shape}"
    return None


def questions_for(objects: list[SceneObject], rng: np.random.Generator, image_size: int) -> list[Question]:
    """One question of every kind that the scene allows; yes/no answers are balanced."""
    qs = []
    o = objects[int(rng.integers(len(objects)))]
    name = _unique_name(o, objects)
    if name is not None:
        qs.append(Question(f"what color is the {name}?", [o.color], question_type="color"))
    name = o.color if sum(p.color == o.color for p in objects) == 1 else f"{o.size} {o.color}"
    if sum(p.color == o.color and p.size == o.size for p in objects) == 1:
        qs.append(Question(f"what shape is the {name} object?", [o.shape], question_type="shape"))
    qs.append(Question(f"what size is the {o.color} {o.shape}?", [o.size], question_type="size"))
    what = rng.choice(["all", "color", "shape"])
    if what == "all":
        qs.append(Question("how many objects are there?", [str(len(objects))], question_type="count"))
    elif what == "color":
        c = str(rng.choice(list(COLORS)))
        qs.append(Question(f"how many {c} objects are there?",
                           [str(sum(p.color == c for p in objects))], question_type="count"))
    else:
        s = str(rng.choice(SHAPES))
        qs.append(Question(f"how many {PLURALS[s]} are there?",
                           [str(sum(p.shape == s for p in objects))], question_type="count"))
    present = {(p.color, p.shape) for p in objects}
    if rng.random() < 0.5:
        c, s = o.color, o.shape
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
    article = "an" if c == "orange" else "a"
    qs.append(Question(f"is there {article} {c} {s}?",
                       ["yes" if (c, s) in present else "no"], question_type="exist"))
    sided = [p for p in objects if abs(p.center_x - image_size / 2) > 0.1 * image_size]
    if sided:
        p = sided[int(rng.integers(len(sided)))]
        side = "left" if p.center_x < image_size / 2 else "right"
        qs.append(Question(f"is the {p.color} {p.shape} on the left or on the right?",
                           [side], question_type="spatial"))
    return qs


def render(objects: list, image_size: int) -> Image.Image:
    """The objects (anything with a colour, a shape and a pixel box) drawn on the gray canvas."""
    canvas = Image.new("RGB", (image_size * SUPERSAMPLE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        _draw(draw, o, SUPERSAMPLE)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def make_scene(index: int, split: str = "train", seed: int = 0, image_size: int = 64, family: str = "shapes",
               ) -> Scene:
    """Scene number `index` of a split in a family (`FAMILIES`); the same arguments always give the same scene.

    ``shapes``: this module's scenes; ``relational``: six objects and questions about their relations
    (`vlm.data.relational`); ``mixed``: even indices from shapes, odd ones from relational.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown scene family {family!r} (data.scenes, --scenes): expected one of "
                         f"{', '.join(FAMILIES)}")
    if split not in SPLITS:
        raise VLMError(f"scene split {split!r} (--split): expected one of {', '.join(SPLITS)}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:  # (a model's [height, width] is refused too)
        raise VLMError(f"scene image size {image_size!r} (--image_size, or the model's encoder.image_size): the "
                       f"built-in scenes are square, with a side of at least {MIN_IMAGE_SIZE} pixels")
    if family == "relational" or (family == "mixed" and index % 2):
        from vlm.data.relational import make_relational_scene  # it builds on this module

        return make_relational_scene(index, split, seed, image_size)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = int(rng.integers(1, 5))
    pairs = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
    colors = list(COLORS)
    objects = [
        SceneObject(colors[p // len(SHAPES)], SHAPES[p % len(SHAPES)], size, box)
        for p, (size, box) in zip(pairs, _place(rng, n, image_size), strict=True)
    ]
    objects.sort(key=lambda o: o.center_x)
    image = render(objects, image_size)
    return Scene(image, objects, captions_for(objects), questions_for(objects, rng, image_size))
