"""Generate images from a catfast ONNX export with ONNX Runtime alone: tokenizer -> text encoder -> UNet loop
(DDIM in numpy, classifier-free guidance) -> VAE decoder -> PNG. No torch model runs here (the tokenizer is
transformers' CLIPTokenizer, pure Python). The CUDA execution provider is used when it actually starts on
this machine, otherwise the CPU one.

An export made with adapter inputs serves any of its adapters (``adapter=NAME``: the tensors in
``adapters/NAME/<component>.safetensors`` are fed as the graphs' LoRA inputs) or the base (``adapter=None``:
nothing fed, the LoRA inputs' zero defaults apply).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from catfast.errors import ModelLoadError
from catfast.export.manifest import read_manifest

# re-exported: catfast.bench.onnx and the tests import them from here
from catfast.export.providers import (  # noqa: F401
    PREFERRED_PROVIDERS,
    RunnerError,
    pick_provider,
    read_adapter_feeds,
    session,
    usable_providers,
)
from catfast.folders import check_output_file, write_atomic
from catfast.integrations.tokenizer import load_tokenizer

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


# ----------------------------------------------------------------------------------------------- DDIM


class DDIM:
    """diffusers' DDIMScheduler (eta = 0) in numpy, built from a diffusers scheduler config (the base's
    training schedule): beta schedules linear / scaled_linear / squaredcos_cap_v2 / trained_betas, timestep
    spacing leading / trailing / linspace with steps_offset, prediction epsilon / v_prediction / sample,
    set_alpha_to_one and clip_sample as in diffusers (their DDIM defaults when the config lacks them)."""

    def __init__(self, config: dict):
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if config.get(key):
                raise RunnerError(f"scheduler config sets {key}, which the ONNX runner's DDIM does not implement")
        self.num_train = int(config.get("num_train_timesteps", 1000))
        n = self.num_train
        schedule = config.get("beta_schedule", "linear")
        b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float32)
        elif schedule == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float32)
        elif schedule == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float32) ** 2
        elif schedule == "squaredcos_cap_v2":

            def alpha_bar(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
        else:
            raise RunnerError(f"scheduler beta_schedule {schedule!r} is not supported by the ONNX runner")
        self.alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)
        self.final_alpha_cumprod = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise RunnerError(f"prediction_type {self.prediction_type!r} is not supported by the ONNX runner")
        self.clip_sample = bool(config.get("clip_sample", True))
        self.clip_range = float(config.get("clip_sample_range", 1.0))
        self.spacing = config.get("timestep_spacing", "leading")
        self.offset = int(config.get("steps_offset", 0))
        self.init_noise_sigma = 1.0
        self.num_steps = 0

    def timesteps(self, steps: int) -> np.ndarray:
        """The descending int64 timesteps of a ``steps``-step run (and remember ``steps`` for `step`)."""
        n = self.num_train
        if not 1 <= steps <= n:
            raise RunnerError(f"steps must be in 1..{n}, got {steps}")
        if self.spacing == "linspace":
            ts = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif self.spacing == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.int64) + self.offset
        elif self.spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        else:
            raise RunnerError(f"timestep_spacing {self.spacing!r} is not supported by the ONNX runner")
        self.num_steps = steps
        return ts

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """x_{t-1} from x_t and the model's prediction (deterministic DDIM, eta = 0)."""
        prev_t = t - self.num_train // self.num_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif self.prediction_type == "v_prediction":
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        else:
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        return (a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(np.float32)


# --------------------------------------------------------------------------------------------- pipeline


@dataclass
class OnnxPipeline:
    """An export folder loaded for generation: `OnnxPipeline.load(folder)`, then call it."""

    folder: Path
    manifest: dict
    provider: str
    sessions: dict = field(default_factory=dict)
    tokenizer: object = None
    scheduler_config: dict = field(default_factory=dict)
    _feeds: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, provider: str | None = None) -> OnnxPipeline:

        folder = Path(model_dir)
        manifest = read_manifest(folder)
        missing = [c for c in ("text_encoder", "unet", "vae_decoder") if c not in manifest["components"]]
        if missing:
            raise ModelLoadError(
                f"{folder}: the export has no {', '.join(missing)}; a runnable export needs "
                "--components unet,text_encoder,vae_decoder"
            )
        for name in (manifest["tokenizer"], manifest["scheduler"]):
            if not (folder / name).exists():
                raise ModelLoadError(f"{folder}: {name} is missing")
        chosen = pick_provider(provider)
        sessions = {c: session(folder / manifest["components"][c]["file"], chosen) for c in manifest["components"]}
        tokenizer = load_tokenizer(folder / manifest["tokenizer"])
        config = json.loads((folder / manifest["scheduler"]).read_text())
        return cls(folder, manifest, chosen, sessions, tokenizer, config)

    @property
    def adapters(self) -> list[str]:
        """Adapters this export can switch between (adapter-inputs exports; merged ones have none)."""
        return [a["name"] for a in self.manifest["adapters"]] if self.manifest["mode"] == "adapter_inputs" else []

    def _adapter_feeds(self, name: str | None) -> dict[str, dict[str, np.ndarray]]:
        """component -> LoRA input feeds of adapter ``name`` (None: nothing, the base); read once."""
        if name is None:
            return {}
        if name not in self._feeds:
            self._feeds[name] = read_adapter_feeds(self.folder, self.manifest, name)
        return self._feeds[name]

    def _run(self, component: str, inputs: dict[str, np.ndarray], adapter: str | None) -> list[np.ndarray]:
        sess = self.sessions[component]
        types = {i.name: _NP_DTYPES.get(i.type) for i in sess.get_inputs()}
        feed = {k: v.astype(types[k]) if types.get(k) is not None else v for k, v in inputs.items()}
        feed.update(self._adapter_feeds(adapter).get(component, {}))
        return [o.astype(np.float32) for o in sess.run(None, feed)]

    def encode(self, prompts: list[str], adapter: str | None = None) -> np.ndarray:
        """Text-encoder last hidden states (B, 77, D) of ``prompts``."""
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
        return self._run("text_encoder", {"input_ids": ids.input_ids.astype(np.int64)}, adapter)[0]

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        lat = self.manifest["latent"]
        f = lat["vae_scale_factor"]
        native = lat["sample_size"] * f
        height, width = height or native, width or native
        if (height, width) != (native, native) and not self.manifest["dynamic"]:
            raise RunnerError(
                f"this export has fixed spatial axes ({native}x{native} pixels); "
                f"export with --dynamic for {height}x{width}"
            )
        step = f * lat["multiple_of"]
        if height % step or width % step:
            raise RunnerError(f"height and width must be multiples of {step} pixels, got {height}x{width}")
        return (1, lat["channels"], height // f, width // f)

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        steps: int = 20,
        guidance_scale: float = 5.0,
        seed: int = 0,
        adapter: str | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        output: str = "image",
    ) -> np.ndarray:
        """One image (H, W, 3) float32 in [0, 1]; what diffusers' StableDiffusionPipeline computes with a
        DDIMScheduler from the same config, eta 0, the same initial ``latents`` (default: seeded normal).
        ``output="latent"``: the final latents (1, C, h, w) instead, before the VAE."""
        self._adapter_feeds(adapter)  # fail early on a bad name
        shape = self.latent_shape(height, width)
        cfg = guidance_scale > 1.0
        context = self.encode([negative_prompt, prompt] if cfg else [prompt], adapter)
        ddim = DDIM(self.scheduler_config)
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        x = latents.astype(np.float32) * ddim.init_noise_sigma
        for t in ddim.timesteps(steps):
            x_in = np.concatenate([x, x]) if cfg else x
            timestep = np.full((x_in.shape[0],), t, dtype=np.float32)
            inputs = {"sample": x_in, "timestep": timestep, "encoder_hidden_states": context}
            eps = self._run("unet", inputs, adapter)[0]
            if cfg:
                uncond, cond = eps[:1], eps[1:]
                eps = uncond + guidance_scale * (cond - uncond)
            x = ddim.step(eps, int(t), x)
        if output == "latent":
            return x
        z = x / self.manifest["latent"]["scaling_factor"]
        image = self._run("vae_decoder", {"latent_sample": z}, adapter)[0]
        return np.clip(image[0].transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) float image in [0, 1] as an 8-bit PNG (rounded as diffusers' numpy_to_pil),
    atomically."""

    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())  # a link at ``path`` is replaced, never written through
    return path


UNET_GUIDANCE = 5.0  # a UNet export's default guidance: `catfast serve`'s (serve.requests.GenerationRequest)


def run_onnx(
    model_dir: str | os.PathLike,
    prompt: str,
    out: str | os.PathLike,
    *,
    adapter: str | None = None,
    negative_prompt: str | None = None,
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    provider: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Generate one image for ``prompt`` with the export in ``model_dir`` and write it to ``out`` (PNG,
    atomically). Before any work, RunnerError for: an ``out`` that exists (unless ``overwrite``), is a
    folder or a symbolic link, or cannot be written; steps < 1; a height or width <= 0; a guidance scale
    that is not a finite number. Returns (the PNG's path, the execution provider used).

    A DiT export (FLUX.1 / SD3, manifest ``family``) runs through ``dit_runner.DitOnnxPipeline``: the flow
    Euler loop at the export's traced size (``height`` / ``width`` must match it when given); ``guidance_scale``
    and ``negative_prompt`` default to the family pipeline's (Flux: embedded guidance 3.5; SD3: CFG 7 with ""),
    a UNet export's to ``UNET_GUIDANCE`` and ""."""

    check_output_file(out, overwrite, RunnerError)
    if steps < 1:
        raise RunnerError(f"steps must be >= 1, got {steps}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and value <= 0:
            raise RunnerError(f"{name} must be a positive number of pixels, got {value}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise RunnerError(f"guidance scale must be a finite number, got {guidance_scale}")
    if read_manifest(model_dir).get("family", "unet") != "unet":
        return _run_dit(
            model_dir, prompt, out, adapter, negative_prompt, steps, guidance_scale, seed, height, width, provider
        )
    pipe = OnnxPipeline.load(model_dir, provider)
    image = pipe(
        prompt,
        negative_prompt="" if negative_prompt is None else negative_prompt,
        steps=steps,
        guidance_scale=UNET_GUIDANCE if guidance_scale is None else guidance_scale,
        seed=seed,
        adapter=adapter,
        height=height,
        width=width,
    )
    return save_png(image, out), pipe.provider


def _run_dit(model_dir, prompt, out, adapter, negative_prompt, steps, guidance_scale, seed, height, width, provider):
    """``run_onnx`` for a DiT export (FLUX.1 / SD3)."""
    from catfast.export.dit_runner import DitOnnxPipeline  # lazy: the DiT runner

    pipe = DitOnnxPipeline.load(model_dir, provider)
    lat = pipe.manifest["latent"]
    traced = (lat["height"] * lat["vae_scale_factor"], lat["width"] * lat["vae_scale_factor"])
    h, w = height or traced[0], width or traced[1]
    if (h, w) != traced:
        raise RunnerError(
            f"this {pipe.manifest['family']} export is traced at {traced[0]}x{traced[1]} pixels; export again with "
            f"--height {h} --width {w} for {h}x{w}"
        )
    image = pipe(
        prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed, adapter=adapter
    )
    return save_png(image, out), pipe.provider
