"""`catfast bench serve` end to end on the tiny model with small counts: the JSON keys the issue names,
with measured (positive, finite) numbers."""

import json
import math

from click.testing import CliRunner

from catfast.cli import main


def test_bench_serve_json_on_tiny(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    args = "bench serve --model tiny --registered 1,3 --mixed 1,2 --batch 2 --requests 3 --adapters 2 --steps 1"
    args = args.split() + ["--max-batch", "4", "--reps", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    switch = out["switch_ms"]
    assert set(switch["resident"]) == {"1", "3"}
    for key in ("resident", "cold_host", "cold_disk", "diffusers_set_adapters", "diffusers_fuse"):
        assert all(0 < v < 60_000 for v in switch[key].values()), key
    mixed = out["mixed"]
    assert mixed["ratio_1"] == 1.0 and math.isfinite(mixed["ratio_2"]) and mixed["unmerged_vs_merged"] > 0
    assert set(mixed["median_ms"]) == {"n1", "n2", "merged", "base"}
    assert out["throughput"]["vs_diffusers"] > 0 and out["throughput"]["requests"] == 3


def test_bench_serve_bad_counts():
    result = CliRunner().invoke(main, ["bench", "serve", "--registered", "1,x"])
    assert result.exit_code != 0 and "comma-separated" in result.output
