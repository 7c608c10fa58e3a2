"""Generate images from a catfast DiT ONNX export (FLUX.1, SD3) with ONNX Runtime alone: tokenizers (the
``tokenizers`` library on the pipeline's own ``tokenizer.json``) -> the exported text encoders -> the
flow-matching Euler loop (the schedule in numpy) -> the exported VAE decoder -> PNG. No torch runs here.

Each step reproduces ``catfast.eval.flow_sampler``'s (and so the diffusers pipeline's) math:

- schedule: ``FlowMatchEulerDiscreteScheduler.set_timesteps`` in numpy: Flux passes the sigmas
  ``linspace(1, 1/steps, steps)`` and a resolution ``mu`` (``calculate_shift`` over the image tokens), SD3 the
  scheduler's own grid under its static shift; ``shift_terminal`` where the config sets it; a final sigma 0;
- the transformer is fed BY NAME (``transformer_feeds``): Flux's latents packed 2x2 into tokens with their
  ``img_ids`` / ``txt_ids`` and ``timestep = sigma`` (plus ``guidance`` where the model embeds it); SD3's
  latents as they are with ``timestep = 1000 sigma``;
- guidance: Flux's guidance embedding (no CFG rows); SD3's CFG over [negative, prompt] rows;
- Euler: ``x += (sigma_next - sigma) * v`` in fp32; decode ``x / scaling_factor + shift_factor``.

The initial noise is numpy's (``seed``) unless ``latents`` is given: the pipelines draw torch's
``randn`` on a CPU generator, which numpy does not reproduce (pass those latents to match them exactly).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catfast.errors import ModelLoadError
from catfast.export.manifest import read_manifest
from catfast.export.providers import RunnerError, pick_provider, read_adapter_feeds, session

# ------------------------------------------------------------------------------------------ layout


def pack(latents: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]`` (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))


def unpack(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """``pack``'s inverse (``height``, ``width``: latent pixels)."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(b, d // 4, height, width))


def image_ids(height: int, width: int) -> np.ndarray:
    """``[H/2 * W/2, 3]`` position ids (0, row, column) of the packed tokens."""
    ids = np.zeros((height // 2, width // 2, 3), np.float32)
    ids[..., 1] = np.arange(height // 2)[:, None]
    ids[..., 2] = np.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def transformer_feeds(spec: dict, latents: np.ndarray, sigmas: np.ndarray, cond: dict, guidance: float) -> dict:
    """The transformer graph's inputs, by name, for ``latents`` ``[B, C, H, W]`` at ``sigmas`` ``[B]`` with
    ``cond`` (``prompt_embeds``, and ``pooled_prompt_embeds`` or Qwen-Image's ``prompt_embeds_mask``); ``spec`` is the
    manifest's ``transformer`` entry."""
    b, _, h, w = latents.shape
    embeds = cond["prompt_embeds"].astype(np.float32)
    sigmas = np.asarray(sigmas, np.float32).reshape(b)
    feeds = {
        "encoder_hidden_states": embeds,
        "timestep": sigmas if spec["timestep"] == "sigma" else sigmas * np.float32(1000),
    }
    if "pooled_projections" in spec["inputs"]:
        feeds["pooled_projections"] = cond["pooled_prompt_embeds"].astype(np.float32)
    if "encoder_hidden_states_mask" in spec["inputs"]:  # Qwen-Image: 1 for a caption token, 0 for padding
        mask = cond.get("prompt_embeds_mask")
        mask = np.ones(embeds.shape[:2], np.int64) if mask is None else mask.astype(np.int64)
        feeds["encoder_hidden_states_mask"] = mask
    if spec["packing"] == "2x2":
        feeds["hidden_states"] = pack(latents.astype(np.float32))
        feeds["img_ids"] = image_ids(h, w)
        feeds["txt_ids"] = np.zeros((embeds.shape[1], 3), np.float32)
    else:
        feeds["hidden_states"] = latents.astype(np.float32)
    if "guidance" in spec["inputs"]:
        feeds["guidance"] = np.full((b,), guidance, np.float32)
    unknown = set(feeds) - set(spec["inputs"])
    for name in unknown:
        del feeds[name]
    return feeds


def transformer_output(spec: dict, out: np.ndarray, height: int, width: int) -> np.ndarray:
    """The velocity ``[B, C, H, W]`` of the graph's output."""
    return unpack(out, height, width) if spec["packing"] == "2x2" else out


# ---------------------------------------------------------------------------------------- schedule


def calculate_shift(seq_len: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


def flow_sigmas(config: dict, steps: int, image_seq_len: int, *, flow_sigmas: bool, max_shift: float) -> np.ndarray:
    """The ``steps + 1`` fp32 sigmas (the last 0) that ``catfast.integrations.schedulers.flow_sampling_scheduler``
    sets on diffusers' FlowMatchEulerDiscreteScheduler for this config (the model's timestep is 1000 sigma)."""
    for key in (
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "invert_sigmas",
        "stochastic_sampling",
    ):
        if config.get(key):
            raise ModelLoadError(
                f"scheduler config sets {key}, which the ONNX runner's flow schedule does not implement"
            )
    n = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    mu = None
    if flow_sigmas or dynamic:
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift) if config.get("max_shift") is not None else max_shift,
        )
    if flow_sigmas and not config.get("use_flow_sigmas", False):
        sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    else:  # the scheduler's own grid, from its (shifted, fp32) sigma_max to sigma_min
        grid = (np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)).astype(np.float32)
        if not dynamic:
            grid = (shift * grid / (1 + (shift - 1) * grid)).astype(np.float32)
        sigmas = np.linspace(float(grid[0]) * n, float(grid[-1]) * n, steps) / n
    if dynamic:
        if config.get("time_shift_type", "exponential") == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if config.get("shift_terminal"):
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config["shift_terminal"]))
    return np.concatenate([np.asarray(sigmas, np.float32), np.zeros(1, np.float32)])


# ---------------------------------------------------------------------------------------- tokenizers


def load_tokenizer(folder: Path, max_length: int):
    """The ``tokenizers`` tokenizer of ``folder/tokenizer.json``, padding and truncating to ``max_length``
    (what transformers does with padding="max_length", truncation=True)."""
    from tokenizers import Tokenizer  # lazy: tokenizers

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json (the DiT runner reads fast tokenizers only)")
    tok = Tokenizer.from_file(str(path))
    config = (
        json.loads((folder / "tokenizer_config.json").read_text())
        if (folder / "tokenizer_config.json").is_file()
        else {}
    )
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = tok.token_to_id(pad) if pad is not None else None
    if pad_id is None:
        raise ModelLoadError(f"{folder}: tokenizer has no pad token")
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
    return tok


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class DitOnnxPipeline:
    """A DiT export folder loaded for generation: ``DitOnnxPipeline.load(folder)``, then call it."""

    folder: Path
    manifest: dict
    provider: str
    sessions: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)
    scheduler_config: dict = field(default_factory=dict)
    _feeds: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, provider: str | None = None) -> DitOnnxPipeline:
        folder = Path(model_dir)
        manifest = read_manifest(folder)
        wanted = ["transformer", "vae_decoder", *(e["component"] for e in manifest["text"]["encoders"])]
        missing = [c for c in wanted if c not in manifest["components"]]
        if missing:
            raise ModelLoadError(
                f"{folder}: the export has no {', '.join(missing)}; a runnable {manifest['family']} export needs "
                f"--components {','.join(wanted)} (the default)"
            )
        chosen = pick_provider(provider)
        sessions = {c: session(folder / manifest["components"][c]["file"], chosen) for c in wanted}
        tokenizers = {
            e["component"]: load_tokenizer(folder / e["tokenizer"], e["max_length"])
            for e in manifest["text"]["encoders"]
        }
        config = json.loads((folder / manifest["scheduler"]).read_text())
        return cls(folder, manifest, chosen, sessions, tokenizers, config)

    @property
    def adapters(self) -> list[str]:
        return [a["name"] for a in self.manifest["adapters"]] if self.manifest["mode"] == "adapter_inputs" else []

    def _adapter_feeds(self, name: str | None) -> dict:
        if name is None:
            return {}
        if name not in self._feeds:
            self._feeds[name] = read_adapter_feeds(self.folder, self.manifest, name)
        return self._feeds[name]

    def _run(self, component: str, feeds: dict, adapter: str | None = None) -> list[np.ndarray]:
        feeds = {**feeds, **self._adapter_feeds(adapter).get(component, {})}
        return self.sessions[component].run(None, feeds)

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """``prompt_embeds`` and ``pooled_prompt_embeds`` (Qwen-Image: ``prompt_embeds_mask``) of ``prompts`` (the
        family pipeline's encode_prompt)."""
        if self.manifest["family"] == "qwenimage":
            return self._encode_qwen(prompts)
        out = {}
        for e in self.manifest["text"]["encoders"]:
            ids = np.array([x.ids for x in self.tokenizers[e["component"]].encode_batch(list(prompts))], np.int64)
            out[e["component"]] = self._run(e["component"], {"input_ids": ids})
        family = self.manifest["family"]
        if family == "flux":
            return {"prompt_embeds": out["text_encoder_2"][0], "pooled_prompt_embeds": out["text_encoder"][1]}
        # SD3: both CLIPs' penultimate states side by side, zero padded to T5's width, then T5's tokens
        clip = np.concatenate([out["text_encoder"][0], out["text_encoder_2"][0]], axis=-1)
        t5 = out["text_encoder_3"][0]
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        pooled = np.concatenate([out["text_encoder"][1], out["text_encoder_2"][1]], axis=-1)
        return {"prompt_embeds": np.concatenate([clip, t5], axis=-2), "pooled_prompt_embeds": pooled}

    def _encode_qwen(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Qwen-Image's ``prompt_embeds`` ``[B, L, D]`` and ``prompt_embeds_mask`` ``[B, L]`` (L: the export's text
        length): each prompt in the chat template, the last hidden states without the template's prefix and the
        padding (``QwenImagePipeline._get_qwen_prompt_embeds``), padded again to L with mask 0."""
        text = self.manifest["text"]
        length = self.manifest["transformer"]["text_length"]
        tokens = self.tokenizers["text_encoder"].encode_batch([text["template"].format(p) for p in prompts])
        ids = np.array([t.ids for t in tokens], np.int64)
        mask = np.array([t.attention_mask for t in tokens], np.int64)
        states = self._run("text_encoder", {"input_ids": ids, "attention_mask": mask})[0]
        embeds = np.zeros((len(prompts), length, states.shape[-1]), np.float32)
        keep = np.zeros((len(prompts), length), np.int64)
        for i in range(len(prompts)):
            row = states[i][mask[i] == 1][text["drop"] :][:length]
            embeds[i, : len(row)], keep[i, : len(row)] = row, 1
        return {"prompt_embeds": embeds, "prompt_embeds_mask": keep}

    def velocity(self, latents, sigmas, cond, guidance: float, adapter: str | None = None) -> np.ndarray:
        """The transformer's prediction ``[B, C, H, W]`` (one call per row where the graph's batch is fixed at 1)."""
        spec = self.manifest["transformer"]
        h, w = latents.shape[2:]
        if spec.get("batch") == 1 and latents.shape[0] > 1:
            rows = [{k: v[i : i + 1] for k, v in cond.items()} for i in range(latents.shape[0])]
            return np.concatenate(
                [
                    self.velocity(latents[i : i + 1], sigmas[i : i + 1], rows[i], guidance, adapter)
                    for i in range(len(rows))
                ]
            )
        feeds = transformer_feeds(spec, latents, sigmas, cond, guidance)
        return transformer_output(spec, self._run("transformer", feeds, adapter)[0], h, w)

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        steps: int = 28,
        guidance_scale: float | None = None,
        seed: int = 0,
        adapter: str | None = None,
        latents: np.ndarray | None = None,
        output: str = "image",
    ) -> np.ndarray:
        """One image (H, W, 3) float32 in [0, 1] (``output="latent"``: the final latents ``[1, C, h, w]``)."""
        m = self.manifest
        recipe, lat = m["sampler"], m["latent"]
        self._adapter_feeds(adapter)  # fail early on a bad name
        guidance = recipe["guidance_default"] if guidance_scale is None else float(guidance_scale)
        negative = recipe["negative"] if negative_prompt is None else negative_prompt
        cfg = recipe["guidance"] in ("cfg", "cfg_norm") and guidance > 1.0 and negative is not None
        cond = self.encode([negative, prompt] if cfg else [prompt])
        shape = (1, lat["channels"], lat["height"], lat["width"])
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        if tuple(latents.shape) != shape:
            raise RunnerError(f"latents must be {list(shape)} (the export's traced size), got {list(latents.shape)}")
        x = latents.astype(np.float32)
        h, w = shape[2], shape[3]
        tokens = (h // 2) * (w // 2)
        sigmas = flow_sigmas(
            self.scheduler_config, steps, tokens, flow_sigmas=recipe["flow_sigmas"], max_shift=recipe["max_shift"]
        )
        n_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        for i in range(steps):
            t = np.float32(sigmas[i] * np.float32(n_train))  # scheduler.timesteps[i]
            x_in = np.concatenate([x, x]) if cfg else x
            model_sigma = np.full((x_in.shape[0],), t / np.float32(n_train), np.float32)
            v = self.velocity(x_in, model_sigma, cond, guidance, adapter)
            if cfg:
                text = v[1:]
                v = v[:1] + np.float32(guidance) * (text - v[:1])
                if recipe["guidance"] == "cfg_norm":  # QwenImagePipeline: each token's velocity at the cond norm
                    guided, norm = pack(v), np.linalg.norm(pack(text), axis=-1, keepdims=True)
                    scaled = guided * (norm / np.linalg.norm(guided, axis=-1, keepdims=True))
                    v = unpack(scaled.astype(np.float32), h, w)
            x = (x + (sigmas[i + 1] - sigmas[i]) * v).astype(np.float32)
        if output == "latent":
            return x
        if "mean" in lat:  # Qwen-Image: per-channel statistics
            mean, std = (np.asarray(lat[k], np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
            z = x * std + mean
        else:
            z = x / np.float32(lat["scaling_factor"]) + np.float32(lat["shift_factor"])
        image = self._run("vae_decoder", {"latent_sample": z.astype(np.float32)})[0]
        return np.clip(image[0].transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0)
