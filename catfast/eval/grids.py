"""Sample grids: images laid out row-major in a PNG, with optional row labels on the left and column
labels on top, in a font a person can read at the PNG's own size.

Layout (``grid_layout``): pictures smaller than ``min_cell`` pixels are enlarged by a whole factor without
smoothing (nearest neighbour: a 32 px sample becomes 96 px of visible pixels, not a blur); every column is
at least as wide as its label (a label longer than the picture widens its column; its words wrap onto
more lines only where one word alone is wider than the picture); every row is at least as tall as its
label. So no label overlaps another label or a picture, whatever their lengths.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from catfast.folders import write_atomic

LABEL_PAD = 6  # pixels around a label
FONT_SIZE = 14  # pixels; PIL's default bitmap font (about 10 px tall) was hard to read beside 64 px cells
MIN_CELL = 96  # pictures smaller than this (either side) are enlarged, nearest, by a whole factor up to it


def _font(size: int):
    """PIL's bundled scalable font at ``size`` pixels (Pillow >= 10.1 with FreeType), else its bitmap font."""

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a grid goes, in pixels of the PNG. ``factor``: the whole-number enlargement of
    the pictures; ``cell``: (width, height) of one enlarged picture; ``label_w``: the row-label column;
    ``head_h``: the column-label band; ``col_x[c]``/``col_w[c]``: left edge and width of column c;
    ``row_y[r]``/``row_h``: top of row r and the row height; ``col_lines[c]``: column c's label as
    lines; ``line_h``: the height of one text line."""

    factor: int
    cell: tuple[int, int]
    label_w: int
    head_h: int
    col_x: tuple[int, ...]
    col_w: tuple[int, ...]
    row_y: tuple[int, ...]
    row_h: int
    col_lines: tuple[tuple[str, ...], ...]
    line_h: int
    size: tuple[int, int]


def _wrap(text: str, width: int, measure) -> list[str]:
    """``text`` as lines of whole words, each at most ``width`` wide when possible (one long word stays whole)."""
    lines: list[str] = []
    for word in str(text).split() or [""]:
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def grid_layout(
    sizes: list[tuple[int, int]],
    rows: int,
    cols: int,
    labels=None,
    col_labels=None,
    font_size: int = FONT_SIZE,
    min_cell: int | None = MIN_CELL,
) -> GridLayout:
    """The layout (module docstring) of pictures of ``sizes`` (width, height) in ``rows`` x ``cols``."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(text: str) -> int:
        return math.ceil(probe.textlength(str(text), font=font))

    top, bottom = probe.textbbox((0, 0), "Ag", font=font)[1::2]
    line_h = max(font_size, bottom) + 2  # from the draw origin to below the descenders, and a gap
    w0, h0 = max(w for w, _ in sizes), max(h for _, h in sizes)
    factor = max(1, math.ceil(min_cell / min(w0, h0))) if min_cell and min(w0, h0) < min_cell else 1
    cell = (w0 * factor, h0 * factor)
    label_w = max(measure(t) for t in labels) + 2 * LABEL_PAD if labels else 0
    lines = tuple(tuple(_wrap(t, cell[0] - 2 * LABEL_PAD, measure)) for t in col_labels) if col_labels else ()
    col_w = tuple(
        max(cell[0], *(measure(line) + 2 * LABEL_PAD for line in lines[c])) if lines else cell[0] for c in range(cols)
    )
    head_h = max(len(ls) for ls in lines) * line_h + 2 * LABEL_PAD if lines else 0
    row_h = max(cell[1], line_h + 2 * LABEL_PAD) if labels else cell[1]
    col_x = tuple(label_w + sum(col_w[:c]) for c in range(cols))
    row_y = tuple(head_h + r * row_h for r in range(rows))
    size = (label_w + sum(col_w), head_h + rows * row_h)
    return GridLayout(factor, cell, label_w, head_h, col_x, col_w, row_y, row_h, lines, line_h, size)


def save_grid(
    images,
    rows: int,
    cols: int,
    path,
    labels=None,
    col_labels=None,
    font_size: int = FONT_SIZE,
    min_cell: int | None = MIN_CELL,
) -> GridLayout:
    """Write ``images`` (PIL, ``rows * cols`` of them, row-major; every cell takes the size of the largest)
    as one PNG at ``path``, atomically (temp file in the same folder, then os.replace), laid out by
    ``grid_layout`` (module docstring). ``labels``: one string per row, in a white column on the left;
    ``col_labels``: one string per column, in a white band on top (e.g. the sampling seeds). Labels are
    ``font_size`` pixels tall; ``min_cell`` None keeps the pictures' size. Returns the layout."""

    images = list(images)
    if rows < 1 or cols < 1 or len(images) != rows * cols:
        raise ValueError(f"a {rows} x {cols} grid needs {rows * cols} images, got {len(images)}")
    if labels is not None and len(labels) != rows:
        raise ValueError(f"need one label per row ({rows}), got {len(labels)}")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"need one label per column ({cols}), got {len(col_labels)}")
    layout = grid_layout([im.size for im in images], rows, cols, labels, col_labels, font_size, min_cell)
    font = _font(font_size)
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    cw, ch = layout.cell
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        im = im.convert("RGB")
        if layout.factor > 1:
            im = im.resize((im.width * layout.factor, im.height * layout.factor), Image.Resampling.NEAREST)
        x = layout.col_x[c] + (layout.col_w[c] - cw) // 2
        y = layout.row_y[r] + (layout.row_h - ch) // 2
        grid.paste(im, (x, y))
    for r, text in enumerate(labels or ()):
        y = layout.row_y[r] + (layout.row_h - layout.line_h) // 2
        draw.text((LABEL_PAD, y), str(text), fill="black", font=font)
    for c, lines in enumerate(layout.col_lines):
        for k, line in enumerate(lines):
            width = math.ceil(draw.textlength(line, font=font))
            x = layout.col_x[c] + (layout.col_w[c] - width) // 2
            draw.text((x, LABEL_PAD + k * layout.line_h), line, fill="black", font=font)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
    return layout
