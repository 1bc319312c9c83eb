"""The demo world in pictures: generated scenes and questions for the vision-language (VLM) stage.

A tiny VLM (a 2-layer ViT over 24x24-pixel patches, joined to a 4-layer language model) trains for a
few minutes on a CPU. It can only show that it *looks* if the pictures are easy to read and the
questions cannot be answered without them. So the world is drawn, not photographed:

* **A 2x2 grid.** A 48x48 RGB image, black background, split into four 24x24 cells (top left, top
  right, bottom left, bottom right). With the stage's default 24-pixel patches each cell is one
  patch (one image token, one object); with 8-pixel patches it is exactly 3x3 of them, so no object
  ever straddles a patch boundary the ViT has to stitch. A scene holds 1-3 objects in distinct cells; each is a flat
  circle, square or triangle, 18 px across, in one of five pure colours (:data:`VISION_COLOURS`,
  words the text world already uses). ``PIL.ImageDraw`` does not antialias, so every pixel is either
  black or exactly the object's colour: the cell's centre pixel names the colour, its corners name
  the shape (a square fills its top-left corner, a triangle its bottom-left one, a circle neither).
* **Captions first** (phase 1, alignment): "<image>\\nDescribe the picture." -> "A red circle at the
  top left and a blue square at the bottom right." Objects are listed in reading order, so the
  caption is a function of the image and the projector learns to map patches to these words.
* **One-word answers** (phase 2, visual Q&A): colour ("What colour is the circle?" -> "red"), shape
  ("What shape is the blue one?" -> "square"), count ("How many shapes are there?" -> "2"),
  position ("Where is the green triangle?" -> "top left") and one comparison ("Are there more
  circles than squares?" -> "yes"). A one-word answer is graded by exact match, with no parsing of
  free text, and every question asks about something unique in its scene, so exactly one answer is
  right.
* **Balanced answers.** Each kind's answers are drawn in equal shares (:func:`_plan`), so a model
  that ignores the image and always says the most common answer scores only the majority rate of
  that kind (:func:`majority_rate`): 0.2 for colour, 1/3 for shape and count, 0.25 for position,
  0.5 for yes/no. That is what "near chance with a blank image" means: show the trained model an
  all-black image (``dataset.images.blank_like``) and its accuracy should fall to about these
  rates; if it stays high, it has learnt to read the question, not the picture.
* **Unseen scenes are held out.** A scene's key is its sorted tuple of ``(cell, shape, colour)``
  objects; :func:`dataset.demo.split_of` sends ~15% of keys to eval. No eval image is ever in a
  train file, so held-out accuracy measures reading new combinations, not recall of pictures. Every
  single ``(shape, colour)`` and ``(shape, cell)`` pairing still occurs in train: what is new in
  eval is how they are put together.

Generation is deterministic (``random.Random`` seeded with a string; PNGs written without
metadata), and a scene's PNG is drawn once and cached, so the default files take about a second.
Records follow MiniMind-V's parquet format: ``conversations`` (the message list as a JSON string,
one ``<image>`` in the user turn) and ``image_bytes`` (the PNG file).
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dataset.chat_template import IMAGE
from dataset.demo import COLOURS, is_current, split_of

VISION_DEMO_VERSION = 1
IMAGE_SIZE = 48
CELLS = ("top left", "top right", "bottom left", "bottom right")  # reading order
SHAPES = ("circle", "square", "triangle")
# Pure RGB, far apart from each other and from the black background. Pink/orange sit too close to
# red, and black is the background.
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "white": (255, 255, 255)}
VISION_COLOURS = tuple(RGB)
assert set(VISION_COLOURS) <= set(COLOURS)
MARGIN = 3  # an object spans pixels MARGIN .. cell - 1 - MARGIN of its cell: 18 px in a 24 px cell

KINDS = ("colour", "shape", "count", "position", "compare")
ANSWERS = {"colour": VISION_COLOURS, "shape": SHAPES, "count": ("1", "2", "3"), "position": CELLS,
           "compare": ("yes", "no")}
CAPTION_PROMPTS = ("Describe the picture.", "What is in the picture?", "Describe this image.", "What do you see?")
COUNT_PROMPTS = ("How many shapes are there?", "How many shapes do you see?", "How many objects are in the picture?")

Scene = tuple[tuple[str, str, str], ...]  # ((cell, shape, colour), ...) in reading order


@dataclass
class VisionDemoSizes:
    """Record counts per file. ~9k training images of 36 patches each are what a tiny VLM can see a
    few times over in five CPU minutes; eval files are small."""

    caption_train: int = 3000
    caption_eval: int = 200
    qa_train: int = 6000
    qa_eval: int = 400
    seed: int = 0


def scene_key(objects: Iterable[tuple[str, str, str]]) -> tuple:
    """The identity of a scene: its objects, sorted. Two records with the same key show the same image."""
    return tuple(sorted(tuple(o) for o in objects))


def scene_split(objects: Iterable[tuple[str, str, str]]) -> str:
    """``"train"`` or ``"eval"`` for a whole scene (by a stable hash of :func:`scene_key`)."""
    return split_of("scene", *scene_key(objects))


def draw_scene(objects: Sequence[tuple[str, str, str]], size: int = IMAGE_SIZE) -> Image.Image:
    """A black ``size`` x ``size`` RGB image with each ``(cell, shape, colour)`` drawn in its grid cell."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    half = size // 2
    lo, hi = MARGIN * size // IMAGE_SIZE, half - 1 - MARGIN * size // IMAGE_SIZE
    for cell, shape, colour in objects:
        row, col = divmod(CELLS.index(cell), 2)
        x0, y0 = col * half, row * half
        box = (x0 + lo, y0 + lo, x0 + hi, y0 + hi)
        fill = RGB[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            # A two-pixel flat top keeps the triangle symmetric on an even-width grid.
            mid = x0 + (lo + hi) // 2
            draw.polygon([(mid, y0 + lo), (mid + 1, y0 + lo), (x0 + hi, y0 + hi), (x0 + lo, y0 + hi)], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")
    return image


@cache
def _png(objects: Scene) -> bytes:
    """The PNG bytes of a scene, drawn once. Pillow writes no timestamp, so equal scenes give equal bytes."""
    buffer = io.BytesIO()
    draw_scene(objects).save(buffer, format="PNG")
    return buffer.getvalue()


def random_scene(rng: random.Random, split: str, n_objects: int | None = None) -> Scene:
    """A random scene of ``split`` with ``n_objects`` (default: 1-3, equally often) in distinct cells."""
    while True:
        n = n_objects or rng.randint(1, 3)
        cells = sorted(rng.sample(CELLS, n), key=CELLS.index)
        objects = tuple((cell, rng.choice(SHAPES), rng.choice(VISION_COLOURS)) for cell in cells)
        if scene_split(objects) == split:
            return objects


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(objects: Scene) -> str:
    """ "A red circle at the top left, a blue square at the top right and a white triangle at the bottom right." """
    parts = [f"{_a(colour)} {colour} {shape} at the {cell}" for cell, shape, colour in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _record(objects: Scene, question: str, answer: str) -> dict:
    return {
        "conversations": [{"role": "user", "content": f"{IMAGE}\n{question}"}, {"role": "assistant", "content": answer}],
        "image_bytes": _png(objects),
    }


def caption_records(n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` phase-1 records ``{"conversations": [user, assistant], "image_bytes": png}``: a describe
    prompt and the scene's :func:`caption`; scenes of ``split`` only."""
    rng = random.Random(f"vlm-caption-{split}-{seed}")
    out = []
    for _ in range(n):
        objects = random_scene(rng, split)
        out.append(_record(objects, rng.choice(CAPTION_PROMPTS), caption(objects)))
    return out


def _unique(objects: Scene, field: int, value: str) -> bool:
    return sum(o[field] == value for o in objects) == 1


def _ask_colour(rng: random.Random, objects: Scene, target: str) -> tuple[str, str] | None:
    picked = [o for o in objects if o[2] == target]
    if not picked:
        return None
    cell, shape, _ = rng.choice(picked)
    questions = [f"What colour is the shape at the {cell}?"]
    if _unique(objects, 1, shape):
        questions.append(f"What colour is the {shape}?")
    return rng.choice(questions), target


def _ask_shape(rng: random.Random, objects: Scene, target: str) -> tuple[str, str] | None:
    picked = [o for o in objects if o[1] == target]
    if not picked:
        return None
    cell, _, colour = rng.choice(picked)
    questions = [f"What shape is at the {cell}?"]
    if _unique(objects, 2, colour):
        questions.append(f"What shape is the {colour} one?")
    return rng.choice(questions), target


def _ask_count(rng: random.Random, objects: Scene, target: str) -> tuple[str, str] | None:
    return (rng.choice(COUNT_PROMPTS), target) if len(objects) == int(target) else None


def _ask_position(rng: random.Random, objects: Scene, target: str) -> tuple[str, str] | None:
    picked = [o for o in objects if o[0] == target]
    if not picked:
        return None
    _, shape, colour = picked[0]
    questions = []
    if sum(o[1:] == (shape, colour) for o in objects) == 1:
        questions.append(f"Where is the {colour} {shape}?")
    if _unique(objects, 1, shape):
        questions.append(f"Where is the {shape}?")
    return (rng.choice(questions), target) if questions else None


def _compare_question(rng: random.Random) -> tuple[str, int, str, str]:
    """(question, field of the objects to count, a, b) for "Are there more a than b?"."""
    if rng.random() < 0.5:
        a, b = rng.sample(SHAPES, 2)
        return f"Are there more {a}s than {b}s?", 1, a, b
    a, b = rng.sample(VISION_COLOURS, 2)
    return f"Are there more {a} shapes than {b} shapes?", 2, a, b


def _ask_compare(objects: Scene, target: str, compare: tuple[str, int, str, str]) -> tuple[str, str] | None:
    """One comparison of two counts; ties and absent things are "no" too."""
    question, field, a, b = compare
    count = Counter(o[field] for o in objects)
    answer = "yes" if count[a] > count[b] else "no"
    return (question, answer) if answer == target else None


_ASK: dict[str, Callable[[random.Random, Scene, str], tuple[str, str] | None]] = {
    "colour": _ask_colour, "shape": _ask_shape, "count": _ask_count, "position": _ask_position,
}


def _plan(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (kind, answer) targets: kinds in turn, each kind's answers in turn, then shuffled.
    Drawing the answer first and then a scene that fits keeps every kind's answers in equal shares."""
    seen: Counter = Counter()
    plan = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        plan.append((kind, ANSWERS[kind][seen[kind] % len(ANSWERS[kind])]))
        seen[kind] += 1
    rng.shuffle(plan)
    return plan


def qa_records(n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` phase-2 records ``{"conversations": [user, assistant], "image_bytes": png}``: one question
    of a kind in :data:`KINDS` and its one-word answer (lower case, no period); scenes of ``split``."""
    rng = random.Random(f"vlm-qa-{split}-{seed}")
    out = []
    for kind, target in _plan(n, rng):
        # A comparison is fixed before its scene is drawn: re-drawing it on every rejected scene would
        # favour the questions that are easy to answer "yes" (shapes) when the target is "yes", and a
        # model could then answer from the question alone. The other kinds phrase their question from
        # facts that are independent of their answer (a shape's colour says nothing of its cell).
        compare = _compare_question(rng) if kind == "compare" else None
        while True:
            objects = random_scene(rng, split, int(target) if kind == "count" else None)
            asked = _ask_compare(objects, target, compare) if compare else _ASK[kind](rng, objects, target)
            if asked:
                out.append(_record(objects, *asked))
                break
    return out


def question_kind(question: str) -> str:
    """The kind of a demo question, read from the user text (``<image>`` may be in it): one of
    :data:`KINDS`, ``"caption"`` for a describe prompt, else ``"other"``."""
    text = question.replace(IMAGE, "").strip()
    for pattern, kind in ((r"^How many\b", "count"), (r"^Are there more\b", "compare"), (r"^What colour\b", "colour"),
                          (r"^What shape\b", "shape"), (r"^Where is\b", "position")):
        if re.search(pattern, text):
            return kind
    return "caption" if text in CAPTION_PROMPTS else "other"


def _messages(record: dict) -> list[dict]:
    conversations = record["conversations"]
    return json.loads(conversations) if isinstance(conversations, str) else conversations


def majority_rate(records: Iterable[dict]) -> dict[str, float]:
    """Per question kind, the share of its most common answer: the accuracy of a constant guess,
    and about what a model that ignores the image scores. ``conversations`` may be a list or the
    parquet's JSON string."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        user, assistant = _messages(record)[:2]
        answers[question_kind(user["content"])][assistant["content"]] += 1
    return {kind: max(c.values()) / sum(c.values()) for kind, c in sorted(answers.items())}


def question_only_rate(records: Iterable[dict], fit: Iterable[dict] | None = None) -> dict[str, float]:
    """Per kind, the accuracy on ``records`` of the best guess from the question text alone: the
    most common answer of each exact question in ``fit`` (default: ``records`` themselves; a
    question ``fit`` lacks gets its kind's most common answer). This is the ceiling for a model
    shown a blank image, and should sit close to :func:`majority_rate`; a gap means the wording
    gives the answer away. Fitted on ``records`` themselves it is optimistic (a rare question is
    "guessed" from its own answers); pass the train records as ``fit`` to score eval honestly."""
    records = list(records)
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for record in records if fit is None else fit:
        user, assistant = _messages(record)[:2]
        by_question[user["content"]][assistant["content"]] += 1
        by_kind[question_kind(user["content"])][assistant["content"]] += 1
    right: Counter = Counter()
    total: Counter = Counter()
    for record in records:
        user, assistant = _messages(record)[:2]
        kind = question_kind(user["content"])
        seen = by_question.get(user["content"]) or by_kind.get(kind) or Counter({"": 1})
        right[kind] += seen.most_common(1)[0][0] == assistant["content"]
        total[kind] += 1
    return {kind: right[kind] / total[kind] for kind in sorted(total)}


def _write_parquet(path: Path, records: list[dict]) -> None:
    table = pa.table({
        "conversations": pa.array([json.dumps(r["conversations"], ensure_ascii=False) for r in records], pa.string()),
        "image_bytes": pa.array([r["image_bytes"] for r in records], pa.binary()),
    })
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


VISION_DEMO_FILES = ("vlm_caption_train", "vlm_caption_eval", "vlm_qa_train", "vlm_qa_eval")


def vision_texts(out_dir: str | Path, sizes: VisionDemoSizes | None = None) -> Iterator[str]:
    """The words of the *train* picture records (questions without `<image>`, captions, answers), for the
    tokenizer: one vocabulary for the whole course, so "circle" or "bottom right" is a token or two, not
    a letter each. Writes the files first if missing."""
    paths = write_vlm_demo_data(out_dir, sizes)
    for name in ("vlm_caption_train", "vlm_qa_train"):
        for conversations in pq.read_table(paths[name], columns=["conversations"])["conversations"].to_pylist():
            for m in json.loads(conversations):
                text = m["content"].replace(IMAGE, "").strip()
                if text:
                    yield text


def write_vlm_demo_data(out_dir: str | Path, sizes: VisionDemoSizes | None = None) -> dict[str, Path]:
    """Write the picture world as MiniMind-V parquet files and return ``{"vlm_caption_train": Path, ...}``.

    Files: ``vlm_{caption,qa}_{train,eval}.parquet`` in ``out_dir`` plus ``vlm_demo_manifest.json``.
    Idempotent: when the manifest records the same :data:`VISION_DEMO_VERSION` and ``sizes`` and
    every file exists, nothing is rewritten.
    """
    sizes = sizes or VisionDemoSizes()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.parquet" for name in VISION_DEMO_FILES}
    manifest_path = out_dir / "vlm_demo_manifest.json"
    manifest = {"version": VISION_DEMO_VERSION, "sizes": asdict(sizes)}
    if is_current(manifest_path, manifest, paths.values()):
        return paths
    for split in ("train", "eval"):
        _write_parquet(paths[f"vlm_caption_{split}"], caption_records(getattr(sizes, f"caption_{split}"), split, sizes.seed))
        _write_parquet(paths[f"vlm_qa_{split}"], qa_records(getattr(sizes, f"qa_{split}"), split, sizes.seed))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return paths
