"""``dpdm data info`` on folders as users have them: files that cannot be decoded are counted apart and named, and
a class-folder tree reports the labels ``dpdm data prepare`` would write (the same code derives them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.data.prepare import prepare

WIDE = {"COLUMNS": "1000"}


def info(*args):
    result = CliRunner().invoke(app, ["data", "info", *[str(a) for a in args]], env=WIDE)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/cat (3 images), root/dog (2 images and two that cannot be decoded), root/emu (1 image)."""
    root = tmp_path / "tree"
    for i in range(3):
        png(root / "cat" / f"{i}.png", i)
    for i in range(2):
        png(root / "dog" / f"{i}.png", 10 + i)
    png(root / "emu" / "0.png", 20)
    (root / "dog" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "dog" / "truncated.png").write_bytes((root / "cat" / "0.png").read_bytes()[:60])
    return root


def test_unreadable_files_are_counted_apart_and_named(tree):
    facts = json.loads(info(tree, "--json").stdout)
    assert facts["count"] == 6
    assert facts["unreadable"] == ["dog/garbage.png", "dog/truncated.png"]
    text = info(tree).stdout
    assert "  count       6\n" in text
    assert ("  unreadable  2 files that cannot be decoded, not counted: dog/garbage.png, dog/truncated.png "
            "(--json lists them all)") in text
    assert json.loads(info(tree, "--json", "--set", "xflip=true").stdout)["count"] == 12  # 6 images, mirrored


def test_many_unreadable_files_are_named_a_few(tmp_path):
    root = tmp_path / "flat"
    png(root / "a.png", 0)
    for i in range(7):
        (root / f"b{i}.png").write_bytes(b"junk")
    line = next(x for x in info(root).stdout.splitlines() if x.startswith("  unreadable"))
    assert line == ("  unreadable  7 files that cannot be decoded, not counted: b0.png, b1.png, b2.png, b3.png, "
                    "b4.png, ... (--json lists them all)")


def test_a_class_tree_reports_the_labels_prepare_writes(tree, tmp_path):
    facts = json.loads(info(tree, "--json").stdout)
    report = prepare(str(tree), str(tmp_path / "t.zip"), workers=1)  # skips the two unreadable files
    assert report.count == facts["count"] == 6
    assert facts["label_dim"] == report.label_dim == 3
    assert facts["classes"] == report.classes == ["cat", "dog", "emu"]
    assert facts["histogram"] == [3, 2, 1] and facts["labels_from"] == "class folders"
    zipped = json.loads(info(tmp_path / "t.zip", "--json").stdout)  # the ZIP prepare wrote: the same labels
    assert [zipped[k] for k in ("count", "label_dim", "classes", "histogram")] == [6, 3, ["cat", "dog", "emu"],
                                                                                  [3, 2, 1]]
    assert zipped["labels_from"] == "dataset.json"
    text = info(tree).stdout
    assert "  label_dim   3\n" in text and "       1 dog: 2\n" in text
    assert "from the class folders, as `dpdm data prepare` writes them" in text
    assert json.loads(info(tree, "--json", "--set", "labels=false").stdout)["label_dim"] == 0


def test_a_flat_folder_and_loose_images_beside_folders_have_no_labels(tree):
    png(tree / "loose.png", 30)  # prepare refuses to label this tree without --no-labels
    facts = json.loads(info(tree, "--json").stdout)
    assert facts["label_dim"] == 0 and facts["histogram"] is None and facts["count"] == 7
