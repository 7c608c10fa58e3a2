"""Issue 26 §8: grids people can read. Small pictures are enlarged without smoothing, and no label overlaps
another label or a picture, however long (the training sample grid at 32 px used to print its three
column headers on top of each other: "basewithoutwith tri"); the KPS evaluation grid has column headers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from catfast.cli import main
from catfast.eval.grids import LABEL_PAD, save_grid

LONGEST = "sks: a large white star on a blue background, the longest label a run writes (seed 12345)"
HEADS = ["base", "without trigger", "with trigger"]  # the training sample grid's column headers


def _cells(n: int, side: int = 32) -> list:
    """Pictures of one pixel-art pattern each (a 2x2 checker of two colours), all distinct."""
    cells = []
    for i in range(n):
        a = np.zeros((side, side, 3), np.uint8)
        a[:] = (40 + 20 * i, 200, 90)
        a[::2, ::2] = (200, 30 + 20 * i, 60)
        cells.append(Image.fromarray(a))
    return cells


def _ink(a: np.ndarray) -> np.ndarray:
    """Dark (label text) pixels of an RGB array: the cells above are never this dark."""
    return (a < 100).all(axis=-1)


@pytest.mark.parametrize("col_labels", [HEADS, [LONGEST, "b", "with trigger"], ["seed 0", "seed 1", "seed 2"]])
def test_labels_never_overlap_and_small_pictures_are_enlarged_nearest(tmp_path, col_labels):
    rows = [LONGEST, "plain", "a"]
    layout = save_grid(_cells(9), 3, 3, tmp_path / "g.png", labels=rows, col_labels=col_labels)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert grid.shape[:2] == (layout.size[1], layout.size[0])
    # enlarged: a 32 px picture fills 96 px, each source pixel a uniform 3x3 block (nearest, no smoothing)
    assert layout.factor == 3 and layout.cell == (96, 96)
    source = np.asarray(_cells(9)[4])
    x0 = layout.col_x[1] + (layout.col_w[1] - 96) // 2
    y0 = layout.row_y[1] + (layout.row_h - 96) // 2
    assert np.array_equal(grid[y0 : y0 + 96, x0 : x0 + 96], source.repeat(3, 0).repeat(3, 1))
    # the header band: each column's label ink lies strictly inside its column, with white between columns
    head = _ink(grid[: layout.head_h])
    assert head.any()
    for c in range(3):
        left, right = layout.col_x[c], layout.col_x[c] + layout.col_w[c]
        cols_with_ink = np.nonzero(head[:, left:right].any(axis=0))[0]
        assert len(cols_with_ink), f"column {c} has no label"
        assert cols_with_ink.min() >= 1 and cols_with_ink.max() <= right - left - 2, (c, col_labels[c])
    boundaries = [layout.col_x[c] for c in range(1, 3)] + [layout.label_w]
    assert not head[:, boundaries].any()  # no label crosses into the next column
    # the label column: every row label is inside its row, and left of the pictures
    side = _ink(grid[:, : layout.label_w])
    assert not _ink(grid[layout.head_h :, layout.label_w - LABEL_PAD // 2 : layout.label_w]).any()
    for r in range(3):
        band = side[layout.row_y[r] : layout.row_y[r] + layout.row_h]
        assert band.any(), f"row {r} has no label"
        assert not band[0].any() and not band[-1].any()  # white above and below: rows never touch
    assert not side[: layout.head_h].any()


def test_wide_pictures_are_not_enlarged_and_min_cell_none_keeps_size(tmp_path):
    layout = save_grid(_cells(2, side=128), 1, 2, tmp_path / "g.png", col_labels=HEADS[:2])
    assert layout.factor == 1 and layout.cell == (128, 128)
    layout = save_grid(_cells(2), 1, 2, tmp_path / "g.png", min_cell=None)
    assert layout.factor == 1 and Image.open(tmp_path / "g.png").size == (64, 32)


def _longest_run(line: np.ndarray) -> int:
    best = run = 0
    for v in line:
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def _headers_readable(path, heads: int) -> None:
    """The grid at ``path`` has a header band with ``heads`` separate labels (white gaps between them)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    ink = _ink(grid)
    # the band ends at the first line that crosses a picture: 90 non-white pixels in a row (text never has)
    white = (grid > 240).all(axis=-1)
    band_end = next(y for y in range(len(grid)) if _longest_run(~white[y]) >= 90)
    band = ink[:band_end]
    runs, inside, gap = 0, False, 0
    for x in range(band.shape[1]):  # count groups of ink separated by 8+ white columns
        if band[:, x].any():
            runs += not inside
            inside, gap = True, 0
        else:
            gap += 1
            if gap >= 8:
                inside = False
    assert runs == heads, (runs, heads)


def test_training_sample_grid_is_enlarged_with_separate_headers(tmp_path):
    """A real `catfast train --base demo` run with samples: its 32 px grid is enlarged (3x) and its three
    headers are three separate labels."""
    from catfast.demo.run import write_concept

    write_concept(tmp_path / "data", n=2)
    args = f"train --base demo --data {tmp_path / 'data'} --trigger sks --out {tmp_path / 'run'} --steps 1 "
    args += "--set sample_every=1 --set sample_steps=1 --set checkpoint_every=0 --threads 1"
    result = CliRunner().invoke(main, args.split())
    assert result.exit_code == 0, result.output
    (png,) = (tmp_path / "run" / "samples").glob("*.png")
    with Image.open(png) as im:
        assert im.height >= 96 + 20 and im.width >= 3 * 96  # the 32 px samples shown at 96 px
    _headers_readable(png, 3)


def test_kps_grid_has_column_headers(tmp_path):
    from catfast.demo.run import write_concept

    write_concept(tmp_path / "data", n=2)
    run = CliRunner().invoke(
        main,
        f"train --base demo --data {tmp_path / 'data'} --trigger sks --out {tmp_path / 'run'} --steps 1 "
        "--set checkpoint_every=0 --threads 1".split(),
    )
    assert run.exit_code == 0, run.output
    from catfast.demo.encoder import load_encoder
    from catfast.eval.kps import kps_eval
    from catfast.integrations.models import load_base
    from catfast.shipped import encoder_path, model_path

    result = kps_eval(
        load_base(model_path()),
        tmp_path / "run" / "adapter.safetensors",
        ["a star"],
        [0, 1],
        "sks",
        load_encoder(encoder_path()),
        steps=1,
        grid_path=tmp_path / "kps.png",
    )
    assert json.dumps(result["total"])
    with Image.open(tmp_path / "kps.png") as im:
        assert im.width >= 3 * 96
    _headers_readable(tmp_path / "kps.png", 3)
