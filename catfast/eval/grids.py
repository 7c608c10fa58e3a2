"""Sample grids: images laid out row-major in a PNG, with optional row labels on the left and column
labels on top, in a font a person can read at the PNG's own size."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from catfast.folders import write_atomic

LABEL_PAD = 6  # pixels around a label
FONT_SIZE = 14  # pixels; PIL's default bitmap font (about 10 px tall) was hard to read beside 64 px cells


def _font(size: int):
    """PIL's bundled scalable font at ``size`` pixels (Pillow >= 10.1 with FreeType), else its bitmap font."""

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def save_grid(images, rows: int, cols: int, path, labels=None, col_labels=None, font_size: int = FONT_SIZE) -> None:
    """Write ``images`` (PIL, ``rows * cols`` of them, row-major; all cells take the size of the
    largest) as one PNG at ``path``, atomically (temp file in the same folder, then os.replace).
    ``labels``: one string per row, in a white column on the left; ``col_labels``: one string per
    column, in a white band on top (e.g. the sampling seeds). Labels are ``font_size`` pixels tall."""

    images = list(images)
    if rows < 1 or cols < 1 or len(images) != rows * cols:
        raise ValueError(f"a {rows} x {cols} grid needs {rows * cols} images, got {len(images)}")
    if labels is not None and len(labels) != rows:
        raise ValueError(f"need one label per row ({rows}), got {len(labels)}")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"need one label per column ({cols}), got {len(col_labels)}")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(str(t), font=font)) for t in labels) + 2 * LABEL_PAD if labels else 0
    head_h = font_size + 2 * LABEL_PAD if col_labels else 0
    grid = Image.new("RGB", (label_w + cols * cell_w, head_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (label_w + c * cell_w, head_h + r * cell_h))
    for r, text in enumerate(labels or ()):
        y = head_h + r * cell_h + max(LABEL_PAD, (cell_h - font_size) // 2)
        draw.text((LABEL_PAD, y), str(text), fill="black", font=font)
    for c, text in enumerate(col_labels or ()):
        x = label_w + c * cell_w + max(0, (cell_w - int(probe.textlength(str(text), font=font))) // 2)
        draw.text((x, LABEL_PAD), str(text), fill="black", font=font)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
