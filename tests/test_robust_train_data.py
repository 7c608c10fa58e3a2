"""Training data: an image that is a symbolic link leading nowhere (a loop, a missing file) is a bad image
like any other (issue 27, defect 10): `--on-bad-image stop` stops on it naming the file, `skip` warns. On
b9a3351 `is_file()` dropped it from the folder listing without a word, whatever the option said."""

import os

import pytest
from click.testing import CliRunner

from catfast.cli import main
from catfast.errors import CatfastError
from catfast.testing import make_data
from catfast.train.data import Concept, scan_concepts


@pytest.fixture
def data(tmp_path):
    folder = make_data(tmp_path / "stars", n=2)
    os.symlink("loop.png", folder / "loop.png")  # refers to itself
    (folder / "loop.txt").write_text("sks, a star on a red background")
    os.symlink("missing.png", folder / "gone.png")
    (folder / "gone.txt").write_text("sks, a star on a green background")
    return folder


def test_10_links_that_lead_nowhere_stop_the_scan(data):
    with pytest.raises(CatfastError, match=r"gone\.png: unreadable or corrupt image .*--on-bad-image skip"):
        scan_concepts([Concept(data, "sks")], on_bad_image="stop")
    (data / "gone.png").unlink()
    with pytest.raises(CatfastError, match=r"loop\.png: unreadable or corrupt image .*symbolic links"):
        scan_concepts([Concept(data, "sks")], on_bad_image="stop")


def test_10_skip_names_them(data):
    with pytest.warns(UserWarning) as caught:
        examples = scan_concepts([Concept(data, "sks")], on_bad_image="skip")
    assert sorted(e.image.name for e in examples) == ["img0.png", "img1.png"]
    skipped = sorted(str(w.message).split(":")[0].rsplit("/", 1)[1] for w in caught)
    assert skipped == ["gone.png", "loop.png"], [str(w.message) for w in caught]


def test_10_catfast_train_stops_with_one_line(data, tmp_path):
    r = CliRunner().invoke(
        main, ["train", "--base", "demo", "--data", str(data), "--trigger", "sks", "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 1, r.output
    assert "gone.png: unreadable or corrupt image" in r.output and "Traceback" not in r.output
