"""Relational scenes (Sort-of-CLEVR, Santoro et al. 2017): six objects, one of each colour, and questions about
how they relate, deterministic by seed.

A scene is a fixed canvas with one object of each of the six colours (so an object is named by its colour alone),
each a circle, square or triangle, all of one size, apart from each other. Positions are those of the objects'
centres in pixels; distances are Euclidean distances between centres. ``MARGIN`` (a share of the image side)
keeps every asked question clear of ties and borderline cases:

- ``shape`` (non-relational): "what shape is the red object?"
- ``side`` (non-relational): "is the red object on the left or on the right?" (or "at the top or at the bottom?")
  of the image; asked only of objects whose centre is at least MARGIN from the image's middle line.
- ``closest`` / ``farthest``: "what color (shape) is the object closest to / farthest from the red object?": among
  the five other objects, the one at the smallest (largest) distance from X. Asked only of an X whose closest
  (farthest) other object is nearer (farther) by at least MARGIN than the runner-up: no near-ties.
- ``count_same``: "how many other objects have the same shape as the red object?": the objects of X's shape, X
  itself not counted (0 to 5, as digits).
- ``relative``: "is the red object left or right of the blue object?" ("above or below"): the sign of the
  difference of the two centres along that axis, asked only of pairs at least MARGIN apart along it.
- ``yes_no``: "is there a red circle?" (yes when the red object is a circle) and "is the red object left of the
  blue object?" ("above"), pairs as in ``relative``.
- ``negation``: the same two with "no" / "not": "is there no red circle?" and "is the red object not left of the
  blue object?". "yes" means the negated statement holds: there is no red circle (the red object has another
  shape); the red object is not left of the blue one (it is clearly right of it, as only pairs at least MARGIN
  apart are asked). Yes and no are equally likely in both kinds.

Captions name the objects by colour and shape ("red circle", the phrase of the object's region): the first lists
all six from left to right, the others name relations (closest and farthest, left of and above, how many of each
shape, which objects share a shape). Each object's phrase and box is a region.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from vlm.data.boxes import PixelBox
from vlm.data.records import Question
from vlm.data.scenes import COLORS, SPLITS, Scene, render

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")
SIDE = 0.16
"""Object side as a share of the image side."""
MARGIN = 0.08
"""Least gap, as a share of the image side, between the distance asked about and the runner-up, between two
centres compared along an axis, and between a centre and the image's middle line."""
GAP = 0.03
"""Least empty space between two objects' boxes, as a share of the image side."""
FAMILY_TAG = 1
"""Part of the generator's seed: relational scene i is not drawn from the same random numbers as scene i of the
shapes family."""
KINDS = ("shape", "side", "closest", "farthest", "count_same", "relative", "yes_no", "negation")
RELATIONAL_KINDS = ("closest", "farthest", "count_same", "relative")
NON_RELATIONAL_KINDS = ("shape", "side")
YES_NO_KINDS = ("yes_no", "negation")


@dataclass
class RelationalObject:
    color: str
    shape: str
    box: PixelBox

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        return self.box[0] + self.box[2] / 2, self.box[1] + self.box[3] / 2

    @property
    def center_x(self) -> float:
        return self.center[0]


def distances(objects: list[RelationalObject]) -> np.ndarray:
    """(n, n) Euclidean distances between the objects' centres, in pixels."""
    c = np.array([o.center for o in objects])
    return np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))


def clear_extreme(objects: list[RelationalObject], x: int, farthest: bool, margin: float) -> int | None:
    """The index of the object closest to (farthest from) object x, or None when the runner-up is within margin."""
    d = distances(objects)[x]
    others = sorted((i for i in range(len(objects)) if i != x), key=lambda i: -d[i] if farthest else d[i])
    if abs(d[others[1]] - d[others[0]]) < margin:
        return None
    return others[0]


def _place(rng: np.random.Generator, image_size: int) -> list[PixelBox]:
    """Boxes of six objects, apart from each other by at least GAP."""
    side, gap = SIDE * image_size, GAP * image_size
    while True:
        boxes: list[PixelBox] = []
        for _ in range(500):
            x, y = rng.uniform(1, image_size - side - 1, size=2)
            if all(x + side + gap <= b[0] or b[0] + side + gap <= x or y + side + gap <= b[1]
                   or b[1] + side + gap <= y for b in boxes):
                boxes.append((float(x), float(y), side, side))
                if len(boxes) == len(COLORS):
                    return boxes


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _listing(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1]


def _clear_pairs(objects: list[RelationalObject], axis: int, margin: float) -> list[tuple[int, int]]:
    """Ordered pairs (a, b) whose centres are at least margin apart along axis (0: x, 1: y)."""
    return [(a, b) for a, b in permutations(range(len(objects)), 2)
            if abs(objects[a].center[axis] - objects[b].center[axis]) >= margin]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def captions_for(objects: list[RelationalObject], rng: np.random.Generator, margin: float) -> list[str]:
    """Five reference captions: the objects from left to right, then four that name relations."""
    n = len(objects)
    listing = _listing([_article(o.phrase) for o in objects])
    captions = [f"{listing} from left to right"]
    near = [(x, c) for x in range(n) if (c := clear_extreme(objects, x, False, margin)) is not None]
    far = [(x, f) for x in range(n) if (f := clear_extreme(objects, x, True, margin)) is not None]
    x, c = _pick(rng, near)
    captions.append(f"the {objects[x].phrase} is closest to the {objects[c].phrase}")
    x, f = _pick(rng, far)
    captions.append(f"the {objects[f].phrase} is the object farthest from the {objects[x].phrase}")
    a, b = _pick(rng, _clear_pairs(objects, 0, margin))
    c, d = _pick(rng, _clear_pairs(objects, 1, margin))
    left = "left" if objects[a].center[0] < objects[b].center[0] else "right"
    above = "above" if objects[c].center[1] < objects[d].center[1] else "below"
    captions.append(f"the {objects[a].phrase} is {left} of the {objects[b].phrase} "
                    f"and the {objects[c].phrase} is {above} the {objects[d].phrase}")
    counts = [(sum(o.shape == s for o in objects), s) for s in SHAPES]
    captions.append("there are " + _listing([f"{NUMBER_WORDS[k]} {s if k == 1 else PLURALS[s]}" for k, s in counts]))
    return captions


def questions_for(objects: list[RelationalObject], rng: np.random.Generator, image_size: int) -> list[Question]:
    """Questions of every kind (two each of closest, farthest, yes_no and negation); see the module's docstring."""
    margin = MARGIN * image_size
    n, qs = len(objects), []
    o = _pick(rng, objects)
    qs.append(Question(f"what shape is the {o.color} object?", [o.shape], question_type="shape"))
    mid = image_size / 2
    sided = [(p, axis) for p in objects for axis in (0, 1) if abs(p.center[axis] - mid) >= margin]
    if sided:
        p, axis = _pick(rng, sided)
        if axis == 0:
            qs.append(Question(f"is the {p.color} object on the left or on the right?",
                               ["left" if p.center[0] < mid else "right"], question_type="side"))
        else:
            qs.append(Question(f"is the {p.color} object at the top or at the bottom?",
                               ["top" if p.center[1] < mid else "bottom"], question_type="side"))
    for kind, farthest in (("closest", False), ("farthest", True)):
        clear = [(x, t) for x in range(n) if (t := clear_extreme(objects, x, farthest, margin)) is not None]
        for _ in range(2):
            x, t = _pick(rng, clear)
            what = "color" if rng.random() < 0.5 else "shape"
            where = "closest to" if kind == "closest" else "farthest from"
            qs.append(Question(f"what {what} is the object {where} the {objects[x].color} object?",
                               [getattr(objects[t], what)], question_type=kind))
    o = _pick(rng, objects)
    qs.append(Question(f"how many other objects have the same shape as the {o.color} object?",
                       [str(sum(p.shape == o.shape for p in objects) - 1)], question_type="count_same"))
    axis = int(rng.integers(2))
    a, b = _pick(rng, _clear_pairs(objects, axis, margin))
    words = ("left", "right") if axis == 0 else ("above", "below")
    first = objects[a].center[axis] < objects[b].center[axis]
    relation = f"{words[0]} or {words[1]} of" if axis == 0 else f"{words[0]} or {words[1]}"
    qs.append(Question(f"is the {objects[a].color} object {relation} the {objects[b].color} object?",
                       [words[0] if first else words[1]], question_type="relative"))
    for kind in YES_NO_KINDS:
        qs.append(_exist_question(objects, rng, negated=kind == "negation"))
        qs.append(_relation_question(objects, rng, margin, negated=kind == "negation"))
    return qs


def _exist_question(objects: list[RelationalObject], rng: np.random.Generator, negated: bool) -> Question:
    """"is there (no) a <colour> <shape>?"; the statement "there is one" is true half the time."""
    o = _pick(rng, objects)
    present = bool(rng.random() < 0.5)
    shape = o.shape if present else _pick(rng, [s for s in SHAPES if s != o.shape])
    name = f"{o.color} {shape}"
    if negated:
        return Question(f"is there no {name}?", ["no" if present else "yes"], question_type="negation")
    return Question(f"is there {_article(name)}?", ["yes" if present else "no"], question_type="yes_no")


def _relation_question(objects: list[RelationalObject], rng: np.random.Generator, margin: float,
                       negated: bool) -> Question:
    """"is the X (not) left of / above the Y?" of a pair clearly apart along that axis; the relation holds half
    the time."""
    axis = int(rng.integers(2))
    pairs = _clear_pairs(objects, axis, margin)
    holds = bool(rng.random() < 0.5)
    a, b = _pick(rng, [(a, b) for a, b in pairs
                       if (objects[a].center[axis] < objects[b].center[axis]) == holds])
    relation = "left of" if axis == 0 else "above"
    x, y = objects[a].color, objects[b].color
    if negated:
        return Question(f"is the {x} object not {relation} the {y} object?", ["no" if holds else "yes"],
                        question_type="negation")
    return Question(f"is the {x} object {relation} the {y} object?", ["yes" if holds else "no"],
                    question_type="yes_no")


def _askable(objects: list[RelationalObject], margin: float) -> bool:
    """Every kind of question can be asked clearly: some X has a clear closest and some a clear farthest object,
    and some pair is clearly apart along each axis."""
    n = len(objects)
    return (any(clear_extreme(objects, x, False, margin) is not None for x in range(n))
            and any(clear_extreme(objects, x, True, margin) is not None for x in range(n))
            and all(_clear_pairs(objects, axis, margin) for axis in (0, 1)))


def make_relational_scene(index: int, split: str = "train", seed: int = 0, image_size: int = 64) -> Scene:
    """Relational scene number ``index`` of a split; the same arguments always give the same scene. Training and
    validation draw from different seed streams (as the shapes family does), so no held-out scene is trained on."""
    rng = np.random.default_rng([seed, SPLITS[split], index, FAMILY_TAG])
    margin = MARGIN * image_size
    while True:
        shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=len(COLORS))]
        objects = [RelationalObject(c, s, b) for c, s, b in zip(COLORS, shapes, _place(rng, image_size), strict=True)]
        if _askable(objects, margin):
            break
    objects.sort(key=lambda o: o.center_x)
    image = render(objects, image_size)
    return Scene(image, objects, captions_for(objects, rng, margin), questions_for(objects, rng, image_size))
