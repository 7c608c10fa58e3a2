"""LoRA adapter files: format detection, read/write round trips that keep alpha (alpha != rank) and the
UNet output, kohya name mapping against real module names, merge/unmerge, and every bad input."""

import copy
import json
import os

import pytest
import safetensors.torch
import torch

from catfast.adapters import (
    LoraAdapter,
    LoraLayer,
    detect_format,
    merge_adapter_,
    read_adapter,
    unmerge_adapter_,
    write_adapter,
)
from catfast.adapters.adapter import layer_key
from catfast.adapters.kohya_names import kohya_to_path, sgm_to_diffusers_stem
from catfast.errors import AdapterFormatError, AdapterShapeError, CatfastError
from catfast.integrations.factory import build_unet, unet_config
from catfast.testing import RTOL, SGM_SDXL, assert_rel_close, assert_same_layers, random_adapter, snapshot, unet_inputs


@torch.no_grad()
def unet_out(unet):
    return unet(*unet_inputs()).sample


@pytest.fixture(scope="module")
def base_unet():
    return build_unet("tiny").eval()


@pytest.fixture()
def unet(base_unet):
    return copy.deepcopy(base_unet)


def merged_out(unet, adapter, scale=1.0):
    model = copy.deepcopy(unet)
    merge_adapter_(model, adapter, scale=scale)
    return unet_out(model)


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed by a failed load: {changed[:3]}"


def to_old_diffusers_keys(tensors):
    """peft keys -> the older ``lora.down``/``lora.up`` keys diffusers' training scripts write."""
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------- detect


@pytest.mark.parametrize(
    "keys, fmt",
    [
        (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.x.lora_B.weight"], "peft"),
        (["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"], "peft"),
        (["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"], "diffusers"),
        (["unet.a.to_q.lora.up.weight", "unet.a.proj_in.lora_A.weight"], "diffusers"),  # convert_..._to_diffusers mix
        (["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"], "diffusers"),
        (["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight"], "diffusers"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_x.alpha"], "kohya"),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], "kohya"),
    ],
)
def test_detect_format(keys, fmt):
    assert detect_format(keys) == fmt


def test_detect_format_rejects_non_lora_keys():
    with pytest.raises(AdapterFormatError, match="conv_in.weight"):
        detect_format(["conv_in.weight", "conv_in.bias"])


# ------------------------------------------------------------------------------------ round trips


def test_alpha_changes_the_output(unet):
    """Guards the round-trip tests against passing vacuously: alpha (and B) really change the output."""
    adapter = random_adapter({"unet": unet})
    as_rank = LoraAdapter({k: LoraLayer(v.down, v.up, alpha=v.rank) for k, v in adapter.layers.items()})
    base, with_alpha, with_rank = unet_out(unet), merged_out(unet, adapter), merged_out(unet, as_rank)
    assert (with_alpha - base).abs().max() > 1e-2
    assert (with_alpha - with_rank).abs().max() > 1e-2


@pytest.mark.parametrize("chain", [("diffusers", "kohya", "diffusers"), ("kohya", "diffusers", "kohya")])
def test_round_trip_keeps_alpha_and_output(unet, tmp_path, chain):
    adapter = random_adapter({"unet": unet})
    want = merged_out(unet, adapter)
    current = adapter
    for i, fmt in enumerate(chain):
        path = tmp_path / f"step{i}.safetensors"
        write_adapter(current, path, format=fmt)
        current = read_adapter(path)
        assert current.source_format == ("peft" if fmt == "diffusers" else fmt)
        assert_same_layers(current, adapter)
    assert_rel_close(merged_out(unet, current), want, RTOL, "UNet output after " + " -> ".join(chain))


def test_old_diffusers_keys_with_metadata_round_trip(unet, tmp_path):
    """The older ``lora.down`` key style (what training scripts save) reads with the same alphas."""
    adapter = random_adapter({"unet": unet})
    write_adapter(adapter, tmp_path / "peft.safetensors")
    with safetensors.safe_open(tmp_path / "peft.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    safetensors.torch.save_file(to_old_diffusers_keys(tensors), tmp_path / "old.safetensors", metadata=metadata)
    old = read_adapter(tmp_path / "old.safetensors")
    assert old.source_format == "diffusers"
    assert_same_layers(old, adapter)
    write_adapter(old, tmp_path / "kohya.safetensors", format="kohya")
    assert_rel_close(merged_out(unet, read_adapter(tmp_path / "kohya.safetensors")), merged_out(unet, adapter), RTOL)


def test_oldest_attention_processor_keys(unet, tmp_path):
    """``...attn1.processor.to_q_lora.down.weight`` (no component prefix) maps to ``attn1.to_q`` etc."""
    adapter = random_adapter({"unet": unet}, leaves=("to_q", "to_k", "to_v", "to_out.0"), alphas=(4.0,), ranks=(4,))
    tensors = {}
    for key, layer in adapter.layers.items():
        owner, leaf = key.removeprefix("unet.").rsplit(".to_", 1)  # ...attn1, "q" / "out.0"
        stem = f"{owner}.processor.to_{leaf.removesuffix('.0')}_lora"
        tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = layer.down, layer.up
    safetensors.torch.save_file(tensors, tmp_path / "procs.safetensors")
    got = read_adapter(tmp_path / "procs.safetensors")
    assert got.source_format == "diffusers"
    assert_same_layers(got, adapter)  # no metadata or alpha keys: alpha = rank, diffusers' convention


def test_peft_metadata_patterns_and_rslora(tmp_path):
    """alpha from diffusers' lora_adapter_metadata: lora_alpha default, alpha_pattern (unescaped and
    ``^``-anchored keys as diffusers writes them), rsLoRA (scale alpha/sqrt(r)), per component."""
    g = torch.Generator().manual_seed(0)
    names = ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out", "mid_block.resnets.0.conv1"]
    tensors = {}
    for name in names:
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(4, 8, generator=g)
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(8, 4, generator=g)
    tensors["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = torch.randn(2, 8, generator=g)
    tensors["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = torch.randn(8, 2, generator=g)
    meta = {
        "unet.r": 4,
        "unet.lora_alpha": 6,
        "unet.alpha_pattern": {"down_blocks.0.attentions.0.proj_out": 2, "^mid_block.resnets.0.conv1": 12},
        "text_encoder.r": 2,
        "text_encoder.lora_alpha": 3,
        "text_encoder.use_rslora": True,
    }
    path = tmp_path / "meta.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(meta), "note": "x"})
    got = read_adapter(path)
    alphas = {k: v.alpha for k, v in got.layers.items()}
    assert alphas["unet.down_blocks.0.attentions.0.proj_in"] == 6
    assert alphas["unet.down_blocks.0.attentions.0.proj_out"] == 2
    assert alphas["unet.mid_block.resnets.0.conv1"] == 12
    te = got.layers["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert te.scale == pytest.approx(3 / 2**0.5)
    assert got.metadata == {"note": "x"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_write_keeps_dtype_and_user_metadata(unet, tmp_path, dtype, fmt):
    adapter = random_adapter({"unet": unet}, dtype=dtype, alphas=(1.5, 7.0))
    adapter.metadata = {"ss_network_dim": "4", "trigger": "sks"}
    write_adapter(adapter, tmp_path / "a.safetensors", format=fmt)
    got = read_adapter(tmp_path / "a.safetensors")
    assert_same_layers(got, adapter)
    assert got.metadata == adapter.metadata


def test_write_is_atomic_and_refuses_to_overwrite(unet, tmp_path):
    adapter = random_adapter({"unet": unet}, leaves=("to_q",))
    path = tmp_path / "a.safetensors"
    write_adapter(adapter, path, format="kohya")
    first = path.read_bytes()
    with pytest.raises(CatfastError, match="overwrite"):
        write_adapter(adapter, path)
    assert path.read_bytes() == first
    write_adapter(adapter, path, format="diffusers", overwrite=True)
    assert read_adapter(path).source_format == "peft"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temp file left behind


def test_describe(unet):
    adapter = random_adapter({"unet": unet}, leaves=("attn1.to_q", "ff.net.0.proj", "resnets.0.conv1", "proj_in"))
    info = adapter.describe()
    assert info["targets"] == ["conv1", "ff.net.0.proj", "proj_in", "to_q"]
    assert info["components"] == ["unet"]
    assert info["num_layers"] == len(adapter.layers)
    assert info["num_parameters"] == sum(v.down.numel() + v.up.numel() for v in adapter.layers.values())
    assert info["ranks"] == {k: v.down.shape[0] for k, v in adapter.layers.items()}
    assert set(info["alphas"].values()) <= {3.0, 5.5, 1.0, 2.5}


# ----------------------------------------------------------------------------------- kohya names


def _linear_conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("name", ["tiny", "sd15", "sdxl"])
def test_kohya_rule_inverts_every_unet_module_name(name):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**unet_config(name))
    wrong = [n for n in _linear_conv_names(model) if kohya_to_path(n.replace(".", "_")) != n]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("cls", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_kohya_rule_inverts_every_clip_module_name(cls):
    import transformers

    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    model = getattr(transformers, cls)(config)
    paths = [layer_key("text_encoder", n).removeprefix("text_encoder.") for n in _linear_conv_names(model)]
    assert any(p.startswith("text_model.encoder.layers.1.self_attn") for p in paths)
    wrong = [p for p in paths if kohya_to_path(p.replace(".", "_")) != p]
    assert not wrong, wrong[:5]


# SGM (sd-scripts SDXL) names and the diffusers SDXL module each one is (layers_per_block = 2).
@pytest.fixture(scope="module")
def sdxl_meta_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config("sdxl"))


def test_sgm_names_map_to_sdxl_modules(sdxl_meta_unet):
    modules = set(_linear_conv_names(sdxl_meta_unet))
    assert set(SGM_SDXL.values()) <= modules  # the table itself names real modules
    for stem, path in SGM_SDXL.items():
        assert kohya_to_path(sgm_to_diffusers_stem(stem)) == path, stem


def test_sgm_kohya_file_reads_with_and_without_model(sdxl_meta_unet, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for stem in SGM_SDXL:
        tensors[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(2, 3, generator=g)
        tensors[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(3, 2, generator=g)
        tensors[f"lora_unet_{stem}.alpha"] = torch.tensor(1.0)
    safetensors.torch.save_file(tensors, tmp_path / "sgm.safetensors")
    want = {f"unet.{p}" for p in SGM_SDXL.values()}
    assert set(read_adapter(tmp_path / "sgm.safetensors").layers) == want
    assert set(read_adapter(tmp_path / "sgm.safetensors", models={"unet": sdxl_meta_unet}).layers) == want


def test_kohya_names_resolved_against_a_given_model(unet, tmp_path):
    adapter = random_adapter({"unet": unet}, leaves=("proj_in", "to_out.0", "time_emb_proj"))
    write_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    assert_same_layers(read_adapter(tmp_path / "k.safetensors", models={"unet": unet}), adapter)
    tensors = safetensors.torch.load_file(tmp_path / "k.safetensors")
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.ones(2, 8)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.ones(8, 2)
    safetensors.torch.save_file(tensors, tmp_path / "other.safetensors")
    with pytest.raises(AdapterFormatError, match=r"other\.safetensors.*down_blocks_7_attentions_0_proj_in"):
        read_adapter(tmp_path / "other.safetensors", models={"unet": unet})


# --------------------------------------------------------------------------------- merge / unmerge


def test_merge_scale_and_unmerge(unet):
    adapter = random_adapter({"unet": unet})
    halved = LoraAdapter({k: LoraLayer(v.down, v.up, alpha=v.alpha / 2) for k, v in adapter.layers.items()})
    assert_rel_close(merged_out(unet, adapter, scale=0.5), merged_out(unet, halved), RTOL, "scale=0.5 vs alpha/2")
    before = snapshot(unet)
    merge_adapter_(unet, adapter)
    unmerge_adapter_(unet, adapter)
    for key, value in unet.state_dict().items():
        assert_rel_close(value, before[key], 1e-6, key)


def test_merge_matches_dense_delta(unet):
    """merge_adapter_ adds exactly (alpha / r) * up @ down to each targeted weight, conv layers included."""
    adapter = random_adapter({"unet": unet}, leaves=("conv1", "to_v"))
    before = snapshot(unet)
    merge_adapter_(unet, adapter)
    after = unet.state_dict()
    for key, layer in adapter.layers.items():
        weight = key.removeprefix("unet.") + ".weight"
        delta = (layer.up.flatten(1) @ layer.down.flatten(1)).view_as(before[weight]) * layer.alpha / layer.rank
        assert_rel_close(after[weight] - before[weight], delta, 1e-5, key)


# ------------------------------------------------------------------------------------ bad input


def _write_good(tmp_path, unet, fmt="diffusers"):
    path = tmp_path / f"good_{fmt}.safetensors"
    write_adapter(random_adapter({"unet": unet}, leaves=("to_q", "proj_in")), path, format=fmt)
    return path


def _load_into(unet, path):
    merge_adapter_(unet, read_adapter(path))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty_header"])
def test_corrupt_file(unet, tmp_path, damage):
    path = _write_good(tmp_path, unet)
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": b"\xff" * 64 + data[8:],
            "empty_header": b"",
        }[damage]
    )
    before = snapshot(unet)
    with pytest.raises(AdapterFormatError, match=r"bad\.safetensors"):
        _load_into(unet, bad)
    assert_unchanged(unet, before)


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt", "disguised.safetensors"])
def test_pickle_is_refused(unet, tmp_path, name):
    path = tmp_path / name
    torch.save({"unet.x.lora_A.weight": torch.ones(2, 2)}, path)
    with pytest.raises(AdapterFormatError, match=rf"{name}.*pickle"):
        read_adapter(path)


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"nope\.safetensors: no such file"):
        read_adapter(tmp_path / "nope.safetensors")


def test_folder_with_several_files_is_ambiguous(unet, tmp_path):
    _write_good(tmp_path, unet, "kohya")
    _write_good(tmp_path, unet, "diffusers")
    with pytest.raises(AdapterFormatError, match=r"expected pytorch_lora_weights\.safetensors or one"):
        read_adapter(tmp_path)
    os.rename(tmp_path / "good_kohya.safetensors", tmp_path / "pytorch_lora_weights.safetensors")
    assert read_adapter(tmp_path).source_format == "kohya"


def _rewrite(path, out, edit):
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, out)
    return out


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_unknown_keys_are_listed(unet, tmp_path, fmt):
    bad = _rewrite(_write_good(tmp_path, unet, fmt), tmp_path / "bad.safetensors", lambda t: t.update(
        {"optimizer.step": torch.zeros(1), "unet.conv_in.weight_ema": torch.zeros(1)}
    ))  # fmt: skip
    with pytest.raises(AdapterFormatError, match=r"bad\.safetensors: unknown keys.*optimizer\.step"):
        read_adapter(bad)


@pytest.mark.parametrize("fmt, half", [("diffusers", ".lora_B.weight"), ("kohya", ".lora_up.weight")])
def test_down_without_up(unet, tmp_path, fmt, half):
    def drop_one(tensors):
        del tensors[next(k for k in sorted(tensors) if k.endswith(half))]

    bad = _rewrite(_write_good(tmp_path, unet, fmt), tmp_path / "bad.safetensors", drop_one)
    before = snapshot(unet)
    with pytest.raises(AdapterFormatError, match=r"bad\.safetensors: layer .* has down weights but no up"):
        _load_into(unet, bad)
    assert_unchanged(unet, before)


@pytest.mark.parametrize("fmt, half", [("diffusers", ".lora_B.weight"), ("kohya", ".lora_up.weight")])
def test_rank_mismatch(unet, tmp_path, fmt, half):
    def cut_rank(tensors):
        key = next(k for k in sorted(tensors) if k.endswith(half))
        tensors[key] = tensors[key][:, :1].contiguous()

    bad = _rewrite(_write_good(tmp_path, unet, fmt), tmp_path / "bad.safetensors", cut_rank)
    with pytest.raises(AdapterFormatError, match=r"bad\.safetensors: layer .*rank mismatch"):
        read_adapter(bad)


def test_dora_is_refused(unet, tmp_path):
    bad = _rewrite(_write_good(tmp_path, unet, "kohya"), tmp_path / "bad.safetensors", lambda t: t.update(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.ones(1, 32)}
    ))  # fmt: skip
    with pytest.raises(AdapterFormatError, match=r"bad\.safetensors: DoRA"):
        read_adapter(bad)


def test_adapter_for_another_base_is_rejected_untouched(unet, tmp_path):
    """Layers that fit come first, a misfit last: a half-applied merge would show in the weights."""
    other = build_unet("small")
    adapter = random_adapter({"unet": unet}, leaves=("to_q",))
    misfit = random_adapter({"unet": other}, leaves=("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",))
    adapter.layers.update(misfit.layers)
    path = tmp_path / "mixed.safetensors"
    write_adapter(adapter, path)
    before = snapshot(unet)
    with pytest.raises(AdapterShapeError, match=r"mixed\.safetensors.*attn1\.to_k: weight \(32, 32\) vs LoRA down"):
        _load_into(unet, path)
    assert_unchanged(unet, before)


@pytest.mark.parametrize(
    "path, problem",
    [("down_blocks.0.attentions.0.norm", "is a GroupNorm"), ("down_blocks.0.attentions.0.nope", "no such module")],
)
def test_layer_on_a_missing_or_unsupported_module(unet, path, problem):
    adapter = random_adapter({"unet": unet}, leaves=("to_q",))
    adapter.layers[f"unet.{path}"] = LoraLayer(torch.ones(2, 32), torch.ones(32, 2), alpha=1.0)
    adapter.path = "/data/style.safetensors"
    before = snapshot(unet)
    with pytest.raises(AdapterShapeError, match=rf"style\.safetensors.*{path}: {problem}"):
        merge_adapter_(unet, adapter)
    assert_unchanged(unet, before)
