"""The kernel notebooks: committed without outputs, importing the package rather than copying it,
each executed top to bottom here (CPU, no network), each drawing at least one picture and ending
with an asserted "what breaks without it" experiment. A failing assert in any cell fails the suite."""

from __future__ import annotations

import os
import re

import nbformat
import pytest

from conftest import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
EXPECTED = [
    "01_tokenizer_bpe", "02_rmsnorm_rope", "03_attention_kv_cache", "04_swiglu_moe", "05_pretraining_loss",
    "06_sft_masks_dpo", "07_grpo", "08_ppo_gae", "09_vlm",
]
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PACKAGE_IMPORT = re.compile(r"^\s*(from|import)\s+(model|dataset|trainer)\b", re.M)


def read(path):
    return nbformat.read(path, as_version=4)


def code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_the_course_has_its_notebooks():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = read(path)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert dirty == [], f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_the_package_and_ends_with_an_asserted_experiment(path):
    nb = read(path)
    assert any(PACKAGE_IMPORT.search(s) for s in code(nb)), f"{path.name} must import model/dataset/trainer"
    # The closing experiment: a markdown heading "What breaks without ..." followed by asserting code.
    heads = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and re.search(r"^#+ What breaks without", c.source, re.M)]
    assert heads, f"{path.name} has no '## What breaks without ...' section"
    after = [c.source for c in nb.cells[heads[-1]:] if c.cell_type == "code"]
    assert any(re.search(r"^\s*(assert |torch\.testing\.assert_close)", s, re.M) for s in after), \
        f"{path.name}: the closing experiment asserts nothing"
    assert any("assert_close" in s for s in code(nb)), f"{path.name} never checks itself against the package"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes_top_to_bottom_and_draws(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    nb = read(path)
    # Runs in a scratch folder: a notebook may write files, never into the checkout.
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert pictures, f"{path.name} drew no picture"


def test_readme_course_map_links_every_notebook():
    readme = (REPO_ROOT / "README.md").read_text()
    for name in EXPECTED:
        assert f"notebooks/{name}.ipynb" in readme, f"README's course map does not link {name}"
