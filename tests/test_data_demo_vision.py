"""The picture world: images that show what they claim, answers that are right for the image,
held-out scenes that never reach training, and no answer guessable from the question alone.

The tests read every scene back from the pixels (centre pixel = colour, corners = shape), so an
answer is checked against what the model will actually see, not against the generator's notes."""

import io
import itertools
import json
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset.demo import split_of
from dataset.demo_vision import (
    CELLS,
    IMAGE_SIZE,
    KINDS,
    RGB,
    SHAPES,
    VISION_COLOURS,
    VisionDemoSizes,
    caption_records,
    draw_scene,
    majority_rate,
    qa_records,
    question_kind,
    question_only_rate,
    scene_split,
    write_vlm_demo_data,
)

SMALL = VisionDemoSizes(caption_train=60, caption_eval=20, qa_train=200, qa_eval=50)
PURE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "white": (255, 255, 255)}
CELL_ORIGIN = {"top left": (0, 0), "top right": (24, 0), "bottom left": (0, 24), "bottom right": (24, 24)}
NAME_OF = {rgb: name for name, rgb in PURE.items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """The four files at SMALL sizes, read back: ``{name: [{"messages", "image", "scene"}, ...]}``."""
    paths = write_vlm_demo_data(tmp_path_factory.mktemp("vlm_small"), SMALL)
    out = {}
    for name, path in paths.items():
        table = pq.read_table(path)
        assert table.column_names == ["conversations", "image_bytes"], name
        out[name] = [{"messages": json.loads(r["conversations"]), "image": r["image_bytes"],
                      "scene": read_scene(r["image_bytes"])} for r in table.to_pylist()]
    return out


def read_scene(png: bytes) -> tuple:
    """The objects a picture shows, sorted: ``((cell, shape, colour), ...)``, read from its pixels."""
    image = Image.open(io.BytesIO(png))
    assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    objects = []
    for cell, (x0, y0) in CELL_ORIGIN.items():
        pixels = {image.getpixel((x0 + x, y0 + y)) for x in range(24) for y in range(24)}
        centre = image.getpixel((x0 + 12, y0 + 12))
        if centre == (0, 0, 0):
            assert pixels == {(0, 0, 0)}, f"{cell}: an empty cell must be black"
            continue
        assert pixels == {(0, 0, 0), centre}, f"{cell}: flat colour on black, no antialiasing"
        if image.getpixel((x0 + 3, y0 + 3)) != (0, 0, 0):
            shape = "square"
        elif image.getpixel((x0 + 3, y0 + 20)) != (0, 0, 0):
            shape = "triangle"
        else:
            shape = "circle"
        objects.append((cell, shape, NAME_OF[centre]))
    return tuple(sorted(objects))


def expected_answer(scene: tuple, question: str) -> str:
    """The answer to a demo question, worked out from the scene; fails if the question is ambiguous."""
    def only(objects):
        assert len(objects) == 1, f"{question!r} is ambiguous for {scene}"
        return objects[0]

    q = question.removeprefix("<image>\n")
    if m := re.fullmatch(r"What colour is the shape at the (.+)\?", q):
        return only([o for o in scene if o[0] == m[1]])[2]
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        return only([o for o in scene if o[1] == m[1]])[2]
    if m := re.fullmatch(r"What shape is at the (.+)\?", q):
        return only([o for o in scene if o[0] == m[1]])[1]
    if m := re.fullmatch(r"What shape is the (\w+) one\?", q):
        return only([o for o in scene if o[2] == m[1]])[1]
    if re.fullmatch(r"How many (shapes are there|shapes do you see|objects are in the picture)\?", q):
        return str(len(scene))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        return only([o for o in scene if o[2] == m[1] and o[1] == m[2]])[0]
    if m := re.fullmatch(r"Where is the (\w+)\?", q):
        return only([o for o in scene if o[1] == m[1]])[0]
    if m := re.fullmatch(r"Are there more (\w+)s than (\w+)s\?", q):
        return "yes" if sum(o[1] == m[1] for o in scene) > sum(o[1] == m[2] for o in scene) else "no"
    if m := re.fullmatch(r"Are there more (\w+) shapes than (\w+) shapes\?", q):
        return "yes" if sum(o[2] == m[1] for o in scene) > sum(o[2] == m[2] for o in scene) else "no"
    raise AssertionError(f"not a demo question: {question!r}")


def expected_caption(scene: tuple) -> str:
    parts = [f"a {colour} {shape} at the {cell}" for cell, shape, colour in sorted(scene, key=lambda o: CELLS.index(o[0]))]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def test_colours_are_pure_and_known():
    assert RGB == PURE and set(VISION_COLOURS) == set(PURE)


def test_draw_scene_puts_each_shape_in_its_cell():
    objects = [("top left", "circle", "red"), ("top right", "square", "blue"), ("bottom right", "triangle", "white")]
    image = draw_scene(objects)
    assert image.mode == "RGB" and image.size == (48, 48)
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert read_scene(png.getvalue()) == tuple(sorted(objects))
    assert image.getpixel((12, 12)) == PURE["red"] and image.getpixel((36, 12)) == PURE["blue"]
    assert image.getpixel((12, 36)) == (0, 0, 0) and image.getpixel((36, 36)) == PURE["white"]
    # Big, distinct shapes: a square fills its 18x18 box, a circle ~pi/4 of it, a triangle ~half.
    area = {shape: sum(p != (0, 0, 0) for p in draw_scene([("top left", shape, "green")]).getdata()) for shape in SHAPES}
    assert area["square"] == 18 * 18 and 220 < area["circle"] < 290 and 140 < area["triangle"] < 200


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_vlm_demo_data(tmp_path / "a", SMALL)
    b = write_vlm_demo_data(tmp_path / "b", SMALL)
    c = write_vlm_demo_data(tmp_path / "c", VisionDemoSizes(**{**SMALL.__dict__, "seed": 1}))
    assert set(a) == {f"vlm_{s}_{p}" for s in ("caption", "qa") for p in ("train", "eval")}
    for name in a:
        assert a[name].name == f"{name}.parquet"
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()


def test_records_are_minimind_v_chats_with_one_image(small):
    sizes = {"vlm_caption_train": 60, "vlm_caption_eval": 20, "vlm_qa_train": 200, "vlm_qa_eval": 50}
    for name, records in small.items():
        assert len(records) == sizes[name]
        for r in records:
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            user, answer = (m["content"] for m in r["messages"])
            assert user.count("<image>") == 1 and "<image>" not in answer
            assert r["image"].startswith(b"\x89PNG") and r["scene"]


def test_captions_describe_the_picture(small):
    for name in ("vlm_caption_train", "vlm_caption_eval"):
        for r in small[name]:
            assert question_kind(r["messages"][0]["content"]) == "caption"
            assert r["messages"][1]["content"] == expected_caption(r["scene"])


def test_answers_are_right_for_the_picture(small):
    for name in ("vlm_qa_train", "vlm_qa_eval"):
        kinds = set()
        for r in small[name]:
            question, answer = (m["content"] for m in r["messages"])
            kinds.add(question_kind(question))
            assert answer == expected_answer(r["scene"], question), (question, r["scene"])
            assert answer == answer.lower() and not answer.endswith(".") and len(answer.split()) <= 2
        assert kinds == set(KINDS)


def test_held_out_scenes_never_reach_training(small):
    train = {r["scene"] for name in ("vlm_caption_train", "vlm_qa_train") for r in small[name]}
    held_out = {r["scene"] for name in ("vlm_caption_eval", "vlm_qa_eval") for r in small[name]}
    assert not train & held_out
    assert all(split_of("scene", *key) == "train" for key in train)
    assert all(split_of("scene", *key) == "eval" for key in held_out)


def test_every_pairing_is_seen_in_training(small):
    """What is new in eval is the combination, never a single pairing: each (shape, colour) and
    each (shape, cell) occurs in train, both among all possible train scenes and in the files."""
    scenes = [tuple(zip(cells, looks)) for n in (1, 2, 3) for cells in itertools.combinations(CELLS, n)
              for looks in itertools.product(itertools.product(SHAPES, VISION_COLOURS), repeat=n)]
    objects = [((cell, *look)) for scene in scenes for cell, look in scene if scene_split([(c, *lk) for c, lk in scene]) == "train"]
    held_out = sum(scene_split([(c, *lk) for c, lk in scene]) == "eval" for scene in scenes) / len(scenes)
    assert 0.1 < held_out < 0.2
    written = [o for r in small["vlm_qa_train"] + small["vlm_caption_train"] for o in r["scene"]]
    for pool in (objects, written):
        assert {(s, c) for _, s, c in pool} == set(itertools.product(SHAPES, VISION_COLOURS))
        assert {(s, cell) for cell, s, _ in pool} == set(itertools.product(SHAPES, CELLS))


def test_a_constant_or_question_only_guess_is_near_chance():
    """With a blank image the model has only the question; balanced answers keep it near chance."""
    held_out = qa_records(400, "eval")
    rates = majority_rate(held_out)
    assert set(rates) == set(KINDS)
    assert rates["compare"] <= 0.6
    assert rates["colour"] <= 0.25 and rates["position"] <= 0.3
    assert rates["shape"] <= 0.4 and rates["count"] <= 0.4
    # The best a model can do from the wording alone: learnt on one sample, scored on another.
    fit, test = qa_records(2000, "train", seed=0), qa_records(2000, "train", seed=1)
    assert majority_rate(test) == majority_rate(fit)
    for kind, rate in question_only_rate(test, fit=fit).items():
        assert rate <= rates[kind] + 0.07, (kind, rate)
    # A caption is a function of the scene and held-out scenes are new, so no train caption fits one.
    assert question_only_rate(caption_records(200, "eval"), fit=caption_records(3000, "train")) == {"caption": 0.0}


@pytest.mark.parametrize("question, kind", [
    ("<image>\nWhat colour is the circle?", "colour"),
    ("<image>\nWhat colour is the shape at the top left?", "colour"),
    ("What shape is the blue one?", "shape"),
    ("<image>\nHow many shapes are there?", "count"),
    ("<image>\nWhere is the green triangle?", "position"),
    ("<image>\nAre there more circles than squares?", "compare"),
    ("<image>\nDescribe the picture.", "caption"),
    ("What is 2 + 3?", "other"),
])
def test_question_kind(question, kind):
    assert question_kind(question) == kind


def test_write_is_idempotent_and_rewrites_when_sizes_change(tmp_path):
    paths = write_vlm_demo_data(tmp_path, SMALL)
    stamp = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    manifest = json.loads((tmp_path / "vlm_demo_manifest.json").read_text())
    assert manifest == {"version": 1, "sizes": SMALL.__dict__}
    paths["vlm_qa_train"].write_bytes(b"tampered")
    assert write_vlm_demo_data(tmp_path, SMALL) == paths
    assert paths["vlm_qa_train"].read_bytes() == b"tampered"
    assert all(paths[n].stat().st_mtime_ns == stamp[n] for n in paths if n != "vlm_qa_train")
    write_vlm_demo_data(tmp_path, VisionDemoSizes(**{**SMALL.__dict__, "qa_train": 30}))
    assert pq.read_table(paths["vlm_qa_train"]).num_rows == 30
