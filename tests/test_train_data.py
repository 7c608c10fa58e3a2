"""Training data and the latent cache on real files: PNG/JPEG images written with PIL, captions as .txt
and metadata.jsonl, the tiny (and tiny-sdxl) factory models' real VAE and text encoders, and real
safetensors cache entries on disk."""

import json
import os
import warnings

import pytest
import torch
from PIL import Image

from catfast.errors import CatfastError
from catfast.integrations.factory import build_base, init_model_folder
from catfast.integrations.models import load_base
from catfast.train.cache import batch_order, build_cache, collate, model_identity
from catfast.train.data import Concept, load_image, scan_concepts
from catfast.train.transform import Transform, bucket_sizes, plan_image, render


def _image(path, w, h, seed=0):
    """A random-noise RGB image of w x h saved at ``path`` (format from the suffix)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    Image.frombytes("RGB", (w, h), bytes(pixels.flatten().tolist())).save(path)
    return path


def _folder(root, specs, trigger="sks"):
    """specs: [(name, w, h)]; each image gets ``name.txt`` = "<trigger>, photo <name>"."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, w, h) in enumerate(specs):
        _image(root / name, w, h, seed=i)
        (root / name).with_suffix(".txt").write_text(f"{trigger}, photo {(root / name).stem}\n")
    return root


def _pixels(img):
    """[3, H, W] fp32 in [-1, 1] of an RGB PIL image."""
    w, h = img.size
    return torch.tensor(list(img.tobytes()), dtype=torch.float32).view(h, w, 3).permute(2, 0, 1) / 127.5 - 1


class _Calls:
    """Counts forward calls of real modules (the VAE's encoder, the text encoder) with forward hooks."""

    def __init__(self, *modules):
        self.count = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *args):
        self.count += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def tiny():
    return build_base("tiny")


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_base("tiny-sdxl")


# ---------------------------------------------------------------------------------------------------------
# scanning


def test_scan_txt_and_metadata_captions(tmp_path):
    a = _folder(tmp_path / "a", [("b.jpg", 20, 20), ("a.png", 24, 16)])
    b = tmp_path / "b"
    (b / "sub").mkdir(parents=True)
    _image(b / "x.png", 16, 16)
    _image(b / "sub" / "y.jpeg", 16, 16)
    (b / "x.txt").write_text("ohm, ignored because metadata.jsonl wins")
    rows = [{"file_name": "x.png", "text": "a toy by ohm"}, {"file_name": "sub/y.jpeg", "text": "ohm; a toy"}]
    (b / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (a / "notes.md").write_text("not an image")

    examples = scan_concepts([Concept(a, "sks"), Concept(b, "ohm")])
    assert [(e.image, e.caption, e.caption_stripped, e.concept) for e in examples] == [
        (a / "a.png", "sks, photo a", "photo a", 0),
        (a / "b.jpg", "sks, photo b", "photo b", 0),
        (b / "sub" / "y.jpeg", "ohm; a toy", "a toy", 1),
        (b / "x.png", "a toy by ohm", "a toy by", 1),
    ]


def test_trigger_missing_and_prepend(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _image(d / "one.png", 16, 16)
    (d / "one.txt").write_text("a red  toy\non a table")
    _image(d / "two.png", 16, 16)
    (d / "two.txt").write_text("sks a blue toy")
    with pytest.raises(CatfastError, match=r"one\.png.*does not contain the trigger 'sks'.*--prepend-trigger"):
        scan_concepts([Concept(d, "sks")])
    one, two = scan_concepts([Concept(d, "sks")], prepend_trigger=True)
    assert (one.caption, one.caption_stripped) == ("sks, a red toy on a table", "a red toy on a table")
    assert (two.caption, two.caption_stripped) == ("sks a blue toy", "a blue toy")  # had it: unchanged


def test_folder_errors(tmp_path):
    with pytest.raises(CatfastError, match="no such data folder"):
        scan_concepts([Concept(tmp_path / "missing", "sks")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "caption.txt").write_text("sks, orphan caption")
    with pytest.raises(CatfastError, match=r"empty: no images"):
        scan_concepts([Concept(empty, "sks")])
    d = _folder(tmp_path / "d", [("a.png", 16, 16)])
    _image(d / "nocap.png", 16, 16)
    with pytest.raises(CatfastError, match=r"nocap\.png: no caption: write nocap\.txt"):
        scan_concepts([Concept(d, "sks")])
    (d / "nocap.txt").write_text("sks")
    with pytest.raises(CatfastError, match=r"nocap\.png: caption 'sks' is only the trigger"):
        scan_concepts([Concept(d, "sks")])
    only = scan_concepts([Concept(d, "sks")], require_description=False)[1]  # plain LoRA needs no c-
    assert (only.caption, only.caption_stripped) == ("sks", "")
    with pytest.raises(CatfastError, match="own trigger"):
        scan_concepts([Concept(d, "sks"), Concept(d, "sks")])
    with pytest.raises(CatfastError, match="trigger word is empty"):
        scan_concepts([Concept(d, " ")])
    with pytest.raises(CatfastError, match="on_bad_image"):
        scan_concepts([Concept(d, "sks")], on_bad_image="ignore")


def test_metadata_errors(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _image(d / "a.png", 16, 16)
    meta = d / "metadata.jsonl"
    for content, message in [
        ('\n{"file_name": "a.png", "text": "sks, x"}\n{oops\n', r"metadata\.jsonl, line 3: not valid JSON"),
        ('{"file_name": "gone.png", "text": "sks, x"}\n', r"line 1: names 'gone\.png', but .*gone\.png does not"),
        ('{"file_name": "a.png"}\n', r'line 1: no "text" caption'),
        ('["a.png", "sks"]\n', r"line 1: expected an object"),
        ('{"file_name": "a.png", "text": "sks, x"}\n' * 2, r"line 2: 'a\.png' appears twice"),
    ]:
        meta.write_text(content)
        with pytest.raises(CatfastError, match=message):
            scan_concepts([Concept(d, "sks")])


def test_bad_images_stop_or_skip(tmp_path):
    d = _folder(tmp_path / "d", [("good.png", 16, 16), ("trunc.png", 64, 64), ("junk.jpg", 16, 16)])
    data = (d / "trunc.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])
    (d / "junk.jpg").write_bytes(b"this is not a jpeg" * 10)
    _image(d / "empty.png", 16, 16).write_bytes(b"")
    (d / "empty.txt").write_text("sks, nothing")

    with pytest.raises(CatfastError, match=r"empty\.png: unreadable or corrupt image.*--on-bad-image skip"):
        scan_concepts([Concept(d, "sks")])
    with pytest.warns(UserWarning) as record:
        examples = scan_concepts([Concept(d, "sks")], on_bad_image="skip")
    assert [e.image.name for e in examples] == ["good.png"]
    skipped = sorted(str(w.message).split(":")[0].rsplit("/", 1)[-1] for w in record)
    assert skipped == ["empty.png", "junk.jpg", "trunc.png"]

    (d / "good.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CatfastError, match="every image was skipped"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan_concepts([Concept(d, "sks")], on_bad_image="skip")


# ---------------------------------------------------------------------------------------------------------
# transform


def test_transform_key_and_validation():
    t = Transform(512)
    assert t.key() == Transform(512).key() == Transform(512, allow_upscale=True).key()
    variants = [
        Transform(768),
        Transform(512, center_crop=False),
        Transform(512, random_flip=True),
        Transform(512, buckets=True),
        Transform(512, center_crop=False, crop_variants=3),
    ]
    assert len({t.key()} | {v.key() for v in variants}) == 1 + len(variants)
    with pytest.raises(CatfastError, match="crop_variants=2 needs random crops"):
        Transform(512, crop_variants=2)
    with pytest.raises(CatfastError, match="crop_variants must be >= 1"):
        Transform(512, center_crop=False, crop_variants=0)


def test_bucket_sizes_kohya_style():
    buckets = bucket_sizes(512, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512 and (h, w) in buckets
    assert max(w * h for w, h in buckets) == 512 * 512


def test_plan_buckets_fit_and_upscale(tmp_path):
    path = tmp_path / "x.png"
    # 1000x600 fits several buckets; the closest aspect among those that fit: 640x384 (5:3 exactly)
    plan = plan_image(path, (1000, 600), Transform(512, buckets=True), 64, "d")
    assert plan.target == (640, 384) and plan.resized == (640, 384) and plan.variants == ((0, 0, False),)
    # 600x400 (area < 512^2) fits no bucket: closest overall is 640x384, which needs upscaling
    with pytest.raises(CatfastError, match=r"x\.png: image is 600x400 .* aspect bucket 640x384"):
        plan_image(path, (600, 400), Transform(512, buckets=True), 64, "d")
    plan = plan_image(path, (600, 400), Transform(512, buckets=True, allow_upscale=True), 64, "d")
    assert plan.target == (640, 384) and plan.resized == (640, 427)
    with pytest.raises(CatfastError, match=r"x\.png: image is 511x900 .* training resolution 512x512"):
        plan_image(path, (511, 900), Transform(512), 64, "d")
    # random crops: offsets drawn from the image digest, distinct, inside the slack
    t = Transform(64, center_crop=False, crop_variants=4, random_flip=True)
    plan = plan_image(path, (100, 64), t, 16, "abc")
    assert plan == plan_image(path, (100, 64), t, 16, "abc")
    crops = {(left, top) for left, top, _ in plan.variants}
    assert 1 < len(crops) <= 4 and all(0 <= left <= 36 and top == 0 for left, top in crops)
    assert len(plan.variants) == 2 * len(crops)
    assert len(plan_image(path, (64, 64), t, 16, "abc").variants) == 2  # no slack: one crop, flipped or not


def test_render_crops_and_flips(tmp_path):
    img = load_image(_image(tmp_path / "r.png", 40, 20))
    plan = plan_image(
        tmp_path / "r.png", (40, 20), Transform(16, center_crop=False, crop_variants=2, random_flip=True), 16, "x"
    )
    pixels = render(img, plan)
    assert pixels.shape == (len(plan.variants), 3, 16, 16) and -1 <= pixels.min() and pixels.max() <= 1
    resized = img.resize(plan.resized, Image.LANCZOS)
    for v, (left, top, flip) in enumerate(plan.variants):
        crop = resized.crop((left, top, left + 16, top + 16))
        want = _pixels(crop)
        torch.testing.assert_close(pixels[v], want.flip(-1) if flip else want)


# ---------------------------------------------------------------------------------------------------------
# cache


def _center_crop_latents(base, path, res):
    """The latents of `path` computed by hand: cover-resize, center crop, VAE mean times scaling_factor."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = res / min(w, h)
    rw, rh = max(res, round(w * s)), max(res, round(h * s))
    left, top = (rw - res) // 2, (rh - res) // 2
    crop = img.resize((rw, rh), Image.LANCZOS).crop((left, top, left + res, top + res))
    x = _pixels(crop)
    with torch.no_grad():
        return base.vae.encode(x[None]).latent_dist.mean[0] * base.vae.config.scaling_factor


def test_build_cache_values_hits_misses(tiny, tmp_path):
    d = _folder(tmp_path / "d", [("a.png", 24, 16), ("b.jpg", 16, 30), ("c.png", 16, 16)])
    examples = scan_concepts([Concept(d, "sks")])
    cache = tmp_path / "cache"
    calls = _Calls(tiny.vae.encoder, tiny.text_encoder)
    try:
        ds = build_cache(tiny, examples, Transform(16), cache, progress=False)
        assert calls.count == 2 * len(examples)  # one VAE call and one text-encoder call per example
        assert len(ds) == 3 and all(ds.num_variants(i) == 1 and ds.bucket(i) == (8, 8) for i in range(3))
        for i, ex in enumerate(examples):
            item = ds[(i, 0)]
            torch.testing.assert_close(item["latents"], _center_crop_latents(tiny, ex.image, 16))
            torch.testing.assert_close(item["cond"], tiny.encode_prompt([ex.caption])[0])
            torch.testing.assert_close(item["cond_stripped"], tiny.encode_prompt([ex.caption_stripped])[0])
            assert (item["concept"], item["example"], item["bucket"]) == (0, i, (8, 8))
        assert len(list(cache.glob("*.safetensors"))) == 3 and not list(cache.glob(".*"))  # no temp files left
        assert tiny.vae.device.type == "cpu" and tiny.text_encoder.device.type == "cpu"

        calls.count = 0
        again = build_cache(tiny, examples, Transform(16), cache, progress=False)
        assert calls.count == 0  # every entry reused: no VAE, no text encoder
        for i in range(3):
            torch.testing.assert_close(again[(i, 0)]["latents"], ds[(i, 0)]["latents"], rtol=0, atol=0)
            torch.testing.assert_close(again[(i, 0)]["cond"], ds[(i, 0)]["cond"], rtol=0, atol=0)

        (d / "b.txt").write_text("sks, a different caption")  # one caption changed -> one miss
        build_cache(tiny, scan_concepts([Concept(d, "sks")]), Transform(16), cache, progress=False)
        assert calls.count == 2
        calls.count = 0
        _image(d / "c.png", 16, 16, seed=99)  # one image changed -> one miss
        build_cache(tiny, scan_concepts([Concept(d, "sks")]), Transform(16), cache, progress=False)
        assert calls.count == 2
        calls.count = 0
        build_cache(tiny, examples, Transform(16, random_flip=True), cache, progress=False)  # new transform
        assert calls.count == 6
    finally:
        calls.close()


def test_corrupt_cache_entry_is_reencoded(tiny, tmp_path):
    examples = scan_concepts([Concept(_folder(tmp_path / "d", [("a.png", 16, 16), ("b.png", 20, 16)]), "sks")])
    cache = tmp_path / "cache"
    ds = build_cache(tiny, examples, Transform(16), cache, progress=False)
    files = sorted(cache.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    damaged = files[0]
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    calls = _Calls(tiny.vae.encoder)
    try:
        with pytest.warns(UserWarning, match=rf"{damaged.name}: cache entry is unreadable or damaged"):
            again = build_cache(tiny, examples, Transform(16), cache, progress=False)
        assert calls.count == 1
        for i in range(2):
            torch.testing.assert_close(again[(i, 0)]["latents"], ds[(i, 0)]["latents"])
        calls.count = 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # repaired: no warning, no encoding
            build_cache(tiny, examples, Transform(16), cache, progress=False)
        assert calls.count == 0
    finally:
        calls.close()


def test_cache_input_errors(tiny, tmp_path):
    d = _folder(tmp_path / "d", [("big.png", 32, 32), ("small.png", 12, 14)])
    examples = scan_concepts([Concept(d, "sks")])
    with pytest.raises(
        CatfastError,
        match=r"small\.png: image is 12x14 pixels, smaller than the training "
        r"resolution 16x16.*allow-upscale",
    ):
        build_cache(tiny, examples, Transform(16), tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("*.safetensors"))  # refused before encoding anything
    ds = build_cache(tiny, examples, Transform(16, allow_upscale=True), tmp_path / "c", progress=False)
    assert ds.plans[1].resized == (16, 19) and ds[(1, 0)]["latents"].shape == (4, 8, 8)
    with pytest.raises(CatfastError, match="resolution 18 is not a multiple of 4"):
        build_cache(tiny, examples, Transform(18), tmp_path / "c", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(CatfastError, match="file: cannot create the latent cache folder"):
        build_cache(tiny, examples, Transform(16), tmp_path / "file", progress=False)
    with pytest.raises(CatfastError, match="no training examples"):
        build_cache(tiny, [], Transform(16), tmp_path / "c", progress=False)


def test_buckets_variants_and_batch_order(tiny, tmp_path):
    specs = [
        ("w1.png", 64, 32),
        ("w2.jpg", 70, 34),
        ("t1.png", 32, 64),
        ("s1.png", 32, 32),
        ("s2.jpg", 40, 36),
        ("s3.png", 33, 33),
        ("s4.png", 48, 48),
    ]
    examples = scan_concepts([Concept(_folder(tmp_path / "d", specs), "sks")])
    t = Transform(32, center_crop=False, crop_variants=2, random_flip=True, buckets=True)
    ds = build_cache(tiny, examples, t, tmp_path / "cache", progress=False)
    buckets = {ex.image.name: ds.bucket(i) for i, ex in enumerate(examples)}
    assert buckets == {
        "w1.png": (8, 24),
        "w2.jpg": (8, 24),
        "t1.png": (24, 8),
        "s1.png": (16, 16),
        "s2.jpg": (16, 16),
        "s3.png": (16, 16),
        "s4.png": (16, 16),
    }
    by_name = {ex.image.name: i for i, ex in enumerate(examples)}
    assert ds.num_variants(by_name["s1.png"]) == 2  # exact size: one crop, plain and mirrored
    assert ds.num_variants(by_name["w1.png"]) == 4
    i = by_name["w1.png"]
    assert not torch.equal(ds[(i, 0)]["latents"], ds[(i, 1)]["latents"])
    with pytest.raises(IndexError):
        ds[(i, 4)]

    order = batch_order(ds, 2, seed=3, epoch=1)
    assert order == batch_order(ds, 2, seed=3, epoch=1)
    assert any(batch_order(ds, 2, seed=3, epoch=e) != order for e in range(2, 6))
    assert any(batch_order(ds, 2, seed=s, epoch=1) != order for s in range(4, 8))
    for epoch in range(4):
        batches = batch_order(ds, 2, seed=3, epoch=epoch)
        keys = [k for b in batches for k in b]
        assert sorted(k[0] for k in keys) == list(range(len(ds)))  # each example once per epoch
        assert all(0 <= v < ds.num_variants(e) for e, v in keys)
        for b in batches:
            assert 1 <= len(b) <= 2 and len({ds.bucket(e) for e, _ in b}) == 1
    # 4 square, 2 wide, 1 tall: batches of 3 are [3, 1] + [2] + [1], with drop_last only the full one
    assert sorted(len(b) for b in batch_order(ds, 3, 0, 0)) == [1, 1, 2, 3]
    assert [len(b) for b in batch_order(ds, 3, 0, 0, drop_last=True)] == [3]
    with pytest.raises(CatfastError, match="batch size 5 with drop_last leaves no batch"):
        batch_order(ds, 5, 0, 0, drop_last=True)

    wide = [(by_name["w2.jpg"], 1), (by_name["w1.png"], 3)]
    batch = collate([ds[k] for k in wide])
    assert batch["latents"].shape == (2, 4, 8, 24) and batch["cond"].shape == (2, 77, 32)
    assert batch["concepts"].tolist() == [0, 0] and batch["variants"].tolist() == [1, 3]
    torch.testing.assert_close(batch["latents"][1], ds[wide[1]]["latents"])
    with pytest.raises(ValueError, match="one bucket"):
        collate([ds[wide[0]], ds[(by_name["s1.png"], 0)]])


def test_sdxl_condition_dict(tiny_sdxl, tmp_path):
    d = _folder(tmp_path / "d", [("a.png", 48, 32), ("b.png", 32, 32)])
    examples = scan_concepts([Concept(d, "sks")])
    ds = build_cache(tiny_sdxl, examples, Transform(32, random_flip=True), tmp_path / "cache", progress=False)
    want = tiny_sdxl.encode_prompt([examples[0].caption, examples[0].caption_stripped])
    for variant, crop_left in [(0, 8), (1, 8)]:  # center crop of 48x32 -> 32x32 at left 8 (mirrored: 8)
        item = ds[(0, variant)]
        for cond, row in [(item["cond"], 0), (item["cond_stripped"], 1)]:
            torch.testing.assert_close(cond["encoder_hidden_states"], want["encoder_hidden_states"][row])
            torch.testing.assert_close(
                cond["added_cond_kwargs"]["text_embeds"], want["added_cond_kwargs"]["text_embeds"][row]
            )
            assert cond["added_cond_kwargs"]["time_ids"].tolist() == [32, 48, 0, crop_left, 32, 32]
    batch = collate([ds[(0, 1)], ds[(1, 0)]])
    assert batch["cond"]["encoder_hidden_states"].shape == (2, 77, 64)
    assert batch["cond"]["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    with torch.no_grad():  # the form the SDXL UNet (and cat_loss) takes
        out = tiny_sdxl.unet(batch["latents"], torch.tensor([10, 500]), **batch["cond_stripped"]).sample
    assert out.shape == batch["latents"].shape and torch.isfinite(out).all()


def test_model_identity(tmp_path):
    folder = init_model_folder("tiny", tmp_path / "model")
    a, b = load_base(folder), load_base(folder)
    before = model_identity(a, torch.float32)
    assert before == model_identity(b, torch.float32) != model_identity(a, torch.bfloat16)
    vae_file = next((folder / "vae").glob("*.safetensors"))
    st = vae_file.stat()
    os.utime(vae_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced later: a new identity
    assert model_identity(load_base(folder), torch.float32) != before
    # in memory (no folder): identity of the weights
    x, y = build_base("tiny"), build_base("tiny")
    assert model_identity(x, torch.float32) == model_identity(y, torch.float32)
    with torch.no_grad():
        y.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1
    assert model_identity(x, torch.float32) != model_identity(y, torch.float32)
