"""Sample grids: images laid out row-major in a PNG, with optional row labels on the left."""

from __future__ import annotations

import io

from catfast.folders import write_atomic

LABEL_PAD = 4  # pixels around a label


def save_grid(images, rows: int, cols: int, path, labels=None) -> None:
    """Write ``images`` (PIL, ``rows * cols`` of them, row-major; all cells take the size of the
    largest) as one PNG at ``path``, atomically (temp file in the same folder, then os.replace).
    ``labels``: one string per row, drawn with PIL's default font in a white column on the left."""
    from PIL import Image, ImageDraw, ImageFont

    images = list(images)
    if rows < 1 or cols < 1 or len(images) != rows * cols:
        raise ValueError(f"a {rows} x {cols} grid needs {rows * cols} images, got {len(images)}")
    if labels is not None and len(labels) != rows:
        raise ValueError(f"need one label per row ({rows}), got {len(labels)}")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    font = ImageFont.load_default()
    label_w = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(int(probe.textlength(str(text), font=font)) for text in labels) + 2 * LABEL_PAD
    grid = Image.new("RGB", (label_w + cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (label_w + c * cell_w, r * cell_h))
    for r, text in enumerate(labels or ()):
        draw.text((LABEL_PAD, r * cell_h + LABEL_PAD), str(text), fill="black", font=font)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
