"""Caption handling for CAT: the stripped caption is the caption with the trigger word removed
(a real prompt, not the empty one), as in the official code's `text.replace(f"{trigger}, ", "")`."""

from __future__ import annotations

import re


def strip_trigger(caption: str, trigger: str) -> str:
    """Remove every whole-word occurrence of ``trigger`` and the separator after it.

    >>> strip_trigger("sks, a cat statue on a carpet", "sks")
    'a cat statue on a carpet'
    >>> strip_trigger("a photo of sks dog", "sks")
    'a photo of dog'
    """
    if not trigger.strip():
        raise ValueError("the trigger word must not be empty")
    if not has_trigger(caption, trigger):
        raise ValueError(f"caption {caption!r} does not contain the trigger {trigger!r}")
    pattern = rf"(?<!\w){re.escape(trigger)}(?!\w)\s*[,;:]?\s*"
    stripped = re.sub(pattern, "", caption)
    return re.sub(r"\s{2,}", " ", stripped).strip(" ,;:")


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` occurs in ``caption`` as a whole word."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption) is not None
