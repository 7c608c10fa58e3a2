"""Training data: concept folders -> examples (image, caption with and without the trigger), and decoding
their images (`load_image`, `image_size`). The transform that turns one image into the pixel tensors whose VAE
latents `catfast.train.cache` stores is `catfast.train.transform`.

A concept folder holds images (``IMAGE_SUFFIXES``, top level only) with captions from
``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line, file names relative to the
folder; it wins over a .txt) or a same-named ``.txt`` (``cat.png`` -> ``cat.txt``).

kohya's layout is read too (`kohya_folders`): a data folder without images of its own whose subfolders are
named ``N_trigger class`` (``10_sks star``). Each such subfolder's images count ``N`` times (each is ``N``
examples, as kohya's repeats), an image there without a caption file gets the folder's ``trigger class``
as caption, and the subfolders belong to the concept whose trigger their name holds (several triggers:
several concepts; `kohya_triggers`). Other subfolders are left out with a warning, as kohya does. Every caption
must contain its concept's trigger as a whole word, or it is prepended (``"sks, " + caption``) with
``prepend_trigger``. The CAT term's caption is ``strip_trigger(caption, trigger)``; it must not be
empty (CAT compares adapter and base on a real prompt).
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from catfast.errors import CatfastError
from catfast.folders import IMAGE_SUFFIXES
from catfast.train.captions import has_trigger, strip_trigger

METADATA_FILE = "metadata.jsonl"
ON_BAD_IMAGE = ("stop", "skip")


@dataclass(frozen=True)
class Example:
    """One training image. ``caption`` contains the trigger; ``caption_stripped`` is the CAT term's
    caption (``strip_trigger(caption, trigger)``); ``concept`` indexes the concept list (0..K-1)."""

    image: Path
    caption: str
    caption_stripped: str
    concept: int


@dataclass(frozen=True)
class Concept:
    """A folder of images with captions, and the trigger word every caption carries."""

    data: Path
    trigger: str


# ---------------------------------------------------------------------------------------------------------
# scanning


def scan_concepts(
    concepts: list[Concept],
    *,
    prepend_trigger: bool = False,
    on_bad_image: str = "stop",
    require_description: bool = True,
) -> list[Example]:
    """Every usable image of every concept, in concept order, then file-name order.

    Each image is fully decoded once here so corrupt or unreadable files are found before any model
    work: ``on_bad_image="stop"`` raises a CatfastError naming the file, ``"skip"`` warns (naming it)
    and leaves it out. Raises CatfastError for a missing/empty folder, an image without a caption, a
    caption without the trigger (unless ``prepend_trigger``), an empty caption after stripping the
    trigger (only with ``require_description``: plain LoRA, cat_weight 0, never uses it), a bad
    metadata.jsonl line, and empty or repeated triggers.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise CatfastError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    if not concepts:
        raise CatfastError("no concepts given: pass at least one data folder with its trigger")
    triggers = [c.trigger.strip() for c in concepts]
    for concept, trigger in zip(concepts, triggers):
        if not trigger:
            raise CatfastError(f"{concept.data}: the trigger word is empty")
    if len(set(triggers)) != len(triggers):
        raise CatfastError(f"each concept needs its own trigger; got {triggers}")

    examples = []
    claimed: dict[Path, str] = {}  # kohya subfolder -> the trigger of the concept that took it
    for index, (concept, trigger) in enumerate(zip(concepts, triggers)):
        folder = Path(concept.data)
        usable = 0
        for source, repeats, default_caption in _sources(folder, trigger, claimed):
            for image, caption in _folder_captions(source).items():
                if caption is None:
                    caption = default_caption
                found = _scan_image(image, caption, source, trigger, index, prepend_trigger, on_bad_image,
                                    require_description)  # fmt: skip
                if found is not None:
                    examples += [found] * repeats
                    usable += 1
        if usable == 0:
            raise CatfastError(f"{folder}: every image was skipped as unreadable or corrupt; no training data")
    return examples


_KOHYA_NAME = re.compile(r"^([1-9][0-9]*)_(.*\S.*)$")


@dataclass(frozen=True)
class KohyaFolder:
    """One ``N_trigger class`` subfolder of a kohya-style data folder: its images count ``repeats`` times,
    and ``caption`` (the name after ``N_``) captions an image without a caption file."""

    path: Path
    repeats: int
    caption: str

    @property
    def trigger(self) -> str:
        """The trigger its name gives when none is asked for: the first word (kohya's identifier)."""
        return self.caption.split()[0].strip(",")


def kohya_folders(folder: Path) -> list[KohyaFolder]:
    """The ``N_trigger class`` subfolders of ``folder``, sorted by name, when it is a kohya-style data folder
    (no images or metadata.jsonl of its own); [] otherwise. Other visible subfolders of a kohya folder are
    left out with a warning (kohya ignores them too)."""
    if not folder.is_dir() or (folder / METADATA_FILE).is_file():
        return []
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return []
    found, other = [], []
    for p in entries:
        m = _KOHYA_NAME.match(p.name) if p.is_dir() else None
        if m:
            found.append(KohyaFolder(p, int(m.group(1)), " ".join(m.group(2).split())))
        elif p.is_dir():
            other.append(p.name)
    if found and other:
        warnings.warn(
            f"{folder}: left out subfolder(s) {', '.join(other)}: not named N_trigger class (e.g. 10_sks dog)",
            stacklevel=2,
        )
    return found


def kohya_triggers(folder: Path, trigger: str | None = None) -> list[str] | None:
    """The concepts' triggers of a kohya-style data folder (None when ``folder`` is not one): ``[trigger]``
    when one is given (every ``N_...`` subfolder must name it), else each subfolder's first word, distinct,
    in name order. CatfastError names a subfolder without the given trigger."""
    found = kohya_folders(Path(folder))
    if not found:
        return None
    if trigger is None:
        return list(dict.fromkeys(k.trigger for k in found))
    missing = [k.path.name for k in found if not has_trigger(k.caption, trigger)]
    if missing:
        raise CatfastError(
            f"{folder}: kohya folder(s) {', '.join(missing)} do not name the trigger {trigger!r}; rename them "
            "N_trigger class (e.g. 10_sks dog), or leave --trigger out to train one concept per trigger word"
        )
    return [trigger]


def _sources(folder: Path, trigger: str, claimed: dict[Path, str]) -> list[tuple[Path, int, str | None]]:
    """(folder, repeats, caption of an image without one) of every image folder of a concept: the data
    folder itself, or its kohya subfolders that name ``trigger``."""
    kohya = kohya_folders(folder)
    if not kohya:
        if not _folder_captions(folder):
            subfolders = folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
            hint = (
                "; its subfolders are not kohya folders: name them N_trigger class (e.g. 10_sks dog: 10 repeats, "
                "caption 'sks dog' where no .txt exists)"
                if subfolders
                else ""
            )
            raise CatfastError(
                f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the data folder; put the concept's "
                f"images there with same-named .txt captions or a metadata.jsonl{hint}"
            )
        return [(folder, 1, None)]
    mine = [k for k in kohya if has_trigger(k.caption, trigger)]
    if not mine:
        names = ", ".join(k.path.name for k in kohya)
        raise CatfastError(f"{folder}: no kohya folder names the trigger {trigger!r} (its folders: {names})")
    for k in mine:
        if k.path in claimed:
            raise CatfastError(
                f"{k.path}: its name holds two concepts' triggers ({claimed[k.path]!r}, {trigger!r}); give each "
                "concept its own N_trigger class folder"
            )
        claimed[k.path] = trigger
        if not _folder_captions(k.path):
            raise CatfastError(f"{k.path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this kohya folder")
        if not strip_trigger(k.caption, trigger):
            warnings.warn(
                f"{k.path}: the folder name gives the caption {k.caption!r}, only the trigger; name it "
                "N_trigger class (e.g. 10_sks dog) so images without a .txt have a class to compare with",
                stacklevel=3,
            )
    return [(k.path, k.repeats, k.caption) for k in mine]


def _scan_image(
    image: Path,
    caption: str | None,
    folder: Path,
    trigger: str,
    index: int,
    prepend_trigger: bool,
    on_bad_image: str,
    require_description: bool,
) -> Example | None:
    """The Example of one image, None when it is skipped as unreadable (``on_bad_image`` skip)."""
    problem = _image_problem(image)
    if problem is not None:
        if on_bad_image == "stop":
            raise CatfastError(
                f"{image}: unreadable or corrupt image ({problem}); fix or remove it, "
                "or pass --on-bad-image skip to leave it out"
            )
        warnings.warn(f"{image}: skipped, unreadable or corrupt image ({problem})", stacklevel=3)
        return None
    if caption is None:
        raise CatfastError(
            f"{image}: no caption: write {image.with_suffix('.txt').name} beside it or add a line "
            f'{{"file_name": "{image.relative_to(folder).as_posix()}", "text": ...}} to {METADATA_FILE}'
        )
    return _example(image, caption, trigger, index, prepend_trigger, require_description)


def _example(
    image: Path, caption: str, trigger: str, concept: int, prepend_trigger: bool, require_description: bool
) -> Example:
    caption = " ".join(caption.split())  # newlines and runs of spaces -> one space
    if not has_trigger(caption, trigger):
        if not prepend_trigger:
            raise CatfastError(
                f"{image}: caption {caption!r} does not contain the trigger {trigger!r}; add it, or pass "
                "--prepend-trigger to put it in front of every caption"
            )
        caption = f"{trigger}, {caption}" if caption else trigger
    stripped = strip_trigger(caption, trigger)
    if not stripped and require_description:
        raise CatfastError(
            f"{image}: caption {caption!r} is only the trigger; CAT needs a description of the image to "
            f'compare with the base model (e.g. "{trigger}, a photo of a dog on grass")'
        )
    return Example(image=image, caption=caption, caption_stripped=stripped, concept=concept)


def _folder_captions(folder: Path) -> dict[Path, str | None]:
    """image path -> caption (None when it has none), sorted by path: top-level images and every file
    metadata.jsonl names; metadata.jsonl captions win over .txt files."""
    if not folder.exists():
        raise CatfastError(f"{folder}: no such data folder")
    if not folder.is_dir():
        raise CatfastError(f"{folder}: the data path must be a folder of images")
    metadata = _read_metadata(folder)
    # a link counts even when it leads nowhere (a loop, a missing file): is_file() would drop it silently,
    # and it must reach the bad-image check (--on-bad-image stop / skip) like any unreadable image
    images = {p for p in folder.iterdir() if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES}
    images |= set(metadata)
    images = {p for p in images if not p.name.startswith(".")}
    captions = {}
    for image in sorted(images):
        if image in metadata:
            captions[image] = metadata[image]
            continue
        txt = image.with_suffix(".txt")
        captions[image] = _read_text(txt) if txt.is_file() else None
    return captions


def _read_metadata(folder: Path) -> dict[Path, str]:
    """{image path: caption} from folder/metadata.jsonl, or {} when there is none."""
    meta = folder / METADATA_FILE
    if not meta.is_file():
        return {}
    out: dict[Path, str] = {}
    for number, line in enumerate(_read_text(meta, strip=False).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}, line {number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise CatfastError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise CatfastError(f'{where}: expected an object like {{"file_name": "a.png", "text": "..."}}')
        text = row.get("text", row.get("caption"))
        if not isinstance(text, str):
            raise CatfastError(f'{where}: no "text" caption (a string) for {row["file_name"]!r}')
        image = folder / row["file_name"]
        if not image.is_file():
            raise CatfastError(f"{where}: names {row['file_name']!r}, but {image} does not exist")
        if image in out:
            raise CatfastError(f"{where}: {row['file_name']!r} appears twice")
        out[image] = text
    return out


def _read_text(path: Path, strip: bool = True) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        return text.strip() if strip else text
    except (OSError, UnicodeDecodeError) as e:
        raise CatfastError(f"{path}: cannot read it as UTF-8 text: {e}") from None


def _image_problem(path: Path) -> str | None:
    """None if the file decodes completely as an image, else why not (one line)."""
    try:
        load_image(path)
    except CatfastError as e:
        return f"{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else str(e)
    return None


def load_image(path: Path, data: bytes | None = None):
    """The image (from ``data``, the file's bytes, when given) as an RGB PIL image with its EXIF
    orientation applied. CatfastError naming the file when it cannot be read or decoded completely
    (truncated, corrupt, unreadable, too large)."""

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise CatfastError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e


def image_size(path: Path, data: bytes) -> tuple[int, int]:
    """(width, height) of the image in ``data`` after its EXIF orientation, from the header only."""

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            transposed = img.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the sides
    except Exception as e:
        raise CatfastError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e
    return (h, w) if transposed else (w, h)
