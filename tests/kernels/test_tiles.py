"""The tile table (catfast/kernels/tiles.py): read and checked, per-family fallback, the kernels really take
their tiles from it, and tuning (catfast/bench/tiles.py) refuses on the CPU."""

import json

import pytest
import torch

from catfast.bench import tiles as tuning
from catfast.kernels import tiles
from catfast.kernels.lora_gemm import lora_gemm, segment_outer
from catfast.reference.lora import lora_linear_ref
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import assert_rel_close


def test_shipped_table_is_valid_and_every_candidate_is_well_formed():
    table = tiles.read_table()
    assert set(table["families"]["default"]) == set(tiles.KERNELS)
    for kernel in tiles.KERNELS:
        cfg = tiles.config(kernel, "cpu")
        assert all(cfg[k] >= 16 for k in tiles.BLOCKS[kernel])
        cands = tuning.candidates(kernel)
        assert len(cands) > 1
        fake = {"version": 1, "families": {"default": {**table["families"]["default"], kernel: cands[-1]}}}
        tiles.check_table(fake, "candidate")  # every candidate would be a valid table entry


def test_family_falls_back_to_default_and_bad_tables_are_refused(tmp_path, monkeypatch):
    table = tiles.read_table()
    table["families"]["sm_90"] = {"lora_gemm": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(tiles, "family", lambda device=None: "sm_90")
    monkeypatch.setenv("CATFAST_TILES", str(path))
    tiles.clear_cache()
    try:
        assert tiles.config("lora_gemm")["BLOCK_M"] == 128
        assert tiles.config("segment_outer") == table["families"]["default"]["segment_outer"]
    finally:
        tiles.clear_cache()
    bad = {"version": 1, "families": {"default": {"lora_gemm": {"BLOCK_M": 48, "BLOCK_N": 64, "BLOCK_K": 32}}}}
    path.write_text(json.dumps(bad))
    with pytest.raises(tiles.TileTableError, match="not powers of two \\['BLOCK_M'\\]"):
        tiles.read_table(path)
    path.write_text("{")
    with pytest.raises(tiles.TileTableError, match="cannot read the tile table"):
        tiles.read_table(path)
    with pytest.raises(ValueError, match="unknown kernel"):
        tiles.config("gemm")


def test_kernels_use_the_given_tiles():
    """Tiles of 16 vs the table's 64: the 16-row tiles split each 40-row sample into 3 blocks; both equal the
    reference, so the tiling (not luck) is what the masks handle."""
    g = torch.Generator().manual_seed(0)
    slots = [0, 1, NO_ADAPTER]
    x = torch.randn(3, 40, 24, generator=g)
    w, a, b = torch.randn(20, 24, generator=g), torch.randn(2, 4, 24, generator=g), torch.randn(2, 20, 4, generator=g)
    plan = RowPlan.build(slots, [0.5, 2.0, 0.0], False)
    want = lora_linear_ref(x, w, None, a, b, plan)
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    for cfg in (None, small):
        y, _ = lora_gemm(x.reshape(-1, 24), w.t(), None, a.transpose(1, 2), b.transpose(1, 2), plan.slots,
                         plan.scales, 40, store_low=False, tiles=cfg)  # fmt: skip
        assert_rel_close(y.view(3, 40, 20), want, 1e-5, f"lora_gemm tiles={cfg}")
    lhs, rhs = torch.randn(50, 20, generator=g), torch.randn(50, 24, generator=g)
    seg = torch.tensor([0, 17, 17, 50])
    scale = torch.rand(50, generator=g)
    want = torch.stack([(scale[s:e, None] * lhs[s:e]).t() @ rhs[s:e] for s, e in ((0, 17), (17, 17), (17, 50))])
    for cfg in (None, {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16}):
        assert_rel_close(segment_outer(lhs, rhs, scale, seg, tiles=cfg), want, 1e-5, f"segment_outer tiles={cfg}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: test_tuning_writes_this_gpus_family runs")
def test_tuning_refuses_on_the_cpu(tmp_path):
    with pytest.raises(tiles.TileTableError, match="needs a CUDA GPU"):
        tuning.tune_and_write(tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU (benchmarks/gpu.sh)")
def test_tuning_writes_this_gpus_family(tmp_path):
    path = tmp_path / "tiles.json"
    lines = []
    entry = tuning.tune_and_write(path, ops=["segmented_expand"], echo=lines.append)  # the smallest grid (6 configs)
    table = tiles.read_table(path)
    fam = tiles.family("cuda")
    assert table["families"][fam]["segmented_expand"] == entry["segmented_expand"]
    assert entry["segmented_expand"] in tuning.candidates("segmented_expand")
    assert table["families"]["default"] == tiles.read_table()["families"]["default"]  # other families kept
    assert any("segmented_expand" in line and " ms " in line for line in lines)
