"""What a client hands the engine (``GenerationRequest``) and what it gets back (``RequestHandle``: the
result, cancellation, and an asyncio stream of progress events)."""

from __future__ import annotations

import asyncio
import math
import re
import reprlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from catfast.serve.errors import BadRequest, Cancelled, RequestTimeout

NAME = re.compile(r"[A-Za-z0-9_.-]+")
RESERVED = ("base",)
MAX_ADAPTERS_PER_REQUEST = 8
MAX_WEIGHT = 10.0
# guidance_scale above this is refused. 30 is the top of AUTOMATIC1111's CFG slider; SD pictures saturate
# long before it, and 1e308 turned every latent into Inf (a black PNG answered 200 before this bound).
MAX_GUIDANCE = 30.0
# characters of a prompt or negative prompt. CLIP reads 77 tokens (a few hundred characters) and drops the
# rest, but the tokenizer reads it all on the step thread: encoding a 1 MiB prompt took 1.1 s there (dev CPU),
# 100 to 10000 characters 0.15-0.17 s.
MAX_PROMPT_CHARS = 4000
# request scheduler name -> diffusers scheduler class (deterministic samplers only: the same seed gives
# the same image whatever shares the batch)
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 2, 4, 4


def show(value: Any) -> str:
    """A short repr of a client's value for an error message (long strings and deep containers cut)."""
    return _SHOW.repr(value)


def check_text(value: Any, what: str, *, empty: bool) -> str:
    """``value`` if it is text the model can read: a str of at most MAX_PROMPT_CHARS characters, valid
    Unicode (JSON's "\\ud800" decodes to a lone surrogate, which no tokenizer reads), non-blank unless
    ``empty``; BadRequest otherwise."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    if not empty and not value.replace("\ufeff", "").strip():  # U+FEFF is blank to JSON Schema's \s
        raise BadRequest(f"{what} must be a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        raise BadRequest(
            f"{what} has {len(value)} characters; at most {MAX_PROMPT_CHARS} (the text encoder reads 77 tokens)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        raise BadRequest(
            f"{what} holds a lone surrogate (U+{ord(bad):04X} at character {e.start}), which is not text: send "
            "valid Unicode (a pair like \\ud83d\\ude00 is one character, a half of it alone is not)"
        ) from None
    return value


def check_adapter_name(name: Any) -> str:
    """``name`` if it is a valid adapter name ([A-Za-z0-9_.-]+, not . or .., not "base"), else BadRequest."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", "..") or len(name) > 200:
        raise BadRequest(f"adapter name {show(name)} is invalid: use letters, digits, '_', '.', '-' (not '.' or '..')")
    if name in RESERVED:
        raise BadRequest(f"adapter name {name!r} is reserved (it means the base model without adapters)")
    return name


def _int(value: Any, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():  # JSON's 2.0 is the integer 2 (as JSON Schema says)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer, got {show(value)}")
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BadRequest(f"{what} must be {span}, got {value}")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a finite number, got {show(value)}")
    return float(value)


def parse_size(size: Any) -> tuple[int, int] | None:
    """None, a side in pixels (square), or "WxH" / (W, H) -> (W, H) or None; BadRequest otherwise."""
    if size is None:
        return None
    if isinstance(size, str):
        m = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", size)
        if m is None:
            raise BadRequest(f"size must be like '512x512', got {show(size)}")
        return int(m[1]), int(m[2])
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return _int(size[0], "size width", 1), _int(size[1], "size height", 1)
    side = _int(size, "size", 1)
    return side, side


@dataclass
class GenerationRequest:
    """One prompt, ``n`` images. ``adapters``: {name: weight} (empty = the base model); each image k of
    a request with ``seed`` s starts from the k-th of n noise draws of ``torch.Generator().manual_seed(s)``
    (what diffusers' pipeline draws for ``num_images_per_prompt=n``), so a seeded result does not depend
    on what else shares the batch. ``guidance`` <= 1 runs the conditional rows only (no CFG). Validated
    on construction (BadRequest says what to change). ``scheduler``: "ddim" (eta 0, the default), "euler" or
    "dpmpp_2m" (diffusers' DDIM / EulerDiscrete / DPMSolverMultistep from the model's scheduler config); a
    diffusion transformer base runs its pipeline's flow-matching Euler only ("euler", its default);
    the engine checks size, steps and n against its
    own limits (``Engine.defaults``) when the request is submitted."""

    prompt: str
    adapters: dict[str, float] = field(default_factory=dict)
    n: int = 1
    size: Any = None
    steps: int | None = None  # None: the engine's default (20, or its max_steps when lower)
    guidance: float = 5.0
    seed: int | None = None
    negative_prompt: str = ""
    timeout_s: float | None = None
    scheduler: str | None = None  # None: the engine's first sampler ("ddim" on a UNet, "euler" on a DiT)

    def __post_init__(self) -> None:
        check_text(self.prompt, "prompt", empty=False)
        check_text(self.negative_prompt, "negative_prompt", empty=True)
        adapters = {} if self.adapters is None else self.adapters
        if not isinstance(adapters, dict):
            raise BadRequest(f"adapters must be a mapping of adapter name to weight, got {type(adapters).__name__}")
        adapters = {k: v for k, v in adapters.items() if k != "base"}  # "base" = no adapter
        if len(adapters) > MAX_ADAPTERS_PER_REQUEST:
            raise BadRequest(f"at most {MAX_ADAPTERS_PER_REQUEST} adapters per request, got {len(adapters)}")
        for name, weight in adapters.items():
            check_adapter_name(name)
            w = _float(weight, f"weight of adapter {name!r}")
            if abs(w) > MAX_WEIGHT:
                raise BadRequest(f"weight of adapter {name!r} must be within +-{MAX_WEIGHT}, got {w}")
            adapters[name] = w
        self.adapters = adapters
        self.n = _int(self.n, "n", 1)
        self.size = parse_size(self.size)
        if self.steps is not None:
            self.steps = _int(self.steps, "steps", 1)
        self.guidance = _float(self.guidance, "guidance")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise BadRequest(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {self.guidance:g}")
        if self.seed is not None:
            self.seed = _int(self.seed, "seed", 0, 2**63 - 1)
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or self.scheduler not in SCHEDULERS):
            raise BadRequest(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {show(self.scheduler)}")
        if self.timeout_s is not None:
            self.timeout_s = _float(self.timeout_s, "timeout_s")
            if self.timeout_s <= 0:
                raise BadRequest(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class Event:
    """A progress event: kind "queued", "progress" (``step`` of ``steps`` done), "done" (``images``) or
    "error" (``error``, a ServeError)."""

    kind: str
    step: int = 0
    steps: int = 0
    images: list | None = None
    error: BaseException | None = None


class RequestHandle:
    """The client's side of a submitted request. Thread-safe; ``events()`` works from any asyncio loop."""

    def __init__(self, request: GenerationRequest, request_id: int):
        self.request = request
        self.id = request_id
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._events: list[Event] = []
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._images: list | None = None
        self._error: BaseException | None = None
        self.cancel_requested = False
        self.seed: int | None = request.seed  # the seed used (drawn by the engine when the request had none)
        self.peak_batch = 0  # the most requests that shared one of its UNet calls
        self.latents = None  # the final latents (set when done; what the images were decoded from)
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None  # when the engine admitted it to the running batch

    # ---- client side
    def cancel(self) -> None:
        """Ask the engine to drop this request at the next step boundary (result() raises Cancelled)."""
        self.cancel_requested = True

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list:
        """The images (PIL), waiting up to ``timeout`` seconds (None = until done); raises the request's
        error (Cancelled, RequestTimeout, ...), or RequestTimeout when ``timeout`` passes first."""
        if not self._done.wait(timeout):
            raise RequestTimeout(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return list(self._images)

    async def events(self):
        """Async iterator of ``Event``s from "queued" to "done" / "error" (past events are replayed)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            past = list(self._events)
            finished = self._done.is_set()
            if not finished:
                self._listeners.append((loop, queue))
        try:
            for ev in past:
                yield ev
            if finished:
                return
            while True:
                ev = await queue.get()
                yield ev
                if ev.kind in ("done", "error"):
                    return
        finally:
            with self._lock:
                self._listeners = [(lp, q) for lp, q in self._listeners if q is not queue]

    # ---- engine side
    def emit(self, event: Event) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._events = [e for e in self._events if e.kind != "progress"] + [event]  # keep memory bounded
            if event.kind == "done":
                self._images = event.images
            elif event.kind == "error":
                self._error = event.error
            if event.kind in ("done", "error"):
                self._done.set()
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the client's loop is closed: nobody listens any more
                pass

    def fail(self, error: BaseException) -> None:
        self.emit(Event("error", error=error))

    def cancelled(self) -> None:
        self.fail(Cancelled(f"request {self.id} was cancelled"))
