"""Named sets of LoRA target modules (suffixes of module names, as peft's ``target_modules`` takes them).
Imports nothing: the command line reads these for its defaults before anything heavy loads."""

# Every attention projection (self- and cross-attention: query, key, value, output): the CAT paper's targets
# and catfast's default, for training, benchmarks and the shipped demo adapters.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

# A UNet's resnet convolutions and the projections around its transformer blocks: with the attention projections,
# a LoCon-style set (kohya's LoCon also adapts the down/upsampling convolutions and the feed-forward layers). A
# UNet-only set: a diffusion transformer has no conv1/conv2.
UNET_CONVOLUTIONS = ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out")

# Names ``--targets`` takes for a whole set.
PRESETS = {"attention": ATTENTION_PROJECTIONS, "locon": ATTENTION_PROJECTIONS + UNET_CONVOLUTIONS}


def split_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """The names in ``targets``: a comma-separated string or a list whose items may hold commas."""
    items = [targets] if isinstance(targets, str) else list(targets)
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]


def expand_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """Target suffixes from ``targets`` (``split_targets``), each preset name (``PRESETS``) replaced by its set;
    order kept, duplicates dropped. "locon" -> to_q, to_k, to_v, to_out.0, conv1, ..."""
    out = []
    for item in split_targets(targets):
        for name in PRESETS.get(item, (item,)):
            if name not in out:
                out.append(name)
    return out
