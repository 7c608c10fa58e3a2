"""`catfast bench serve --model tiny-flux` (catfast/bench/serve_dit.py) at tiny settings: the report's fields
(switch_ms per resident count, mixed ratios and unmerged_vs_merged, launch_ops of one sampler step), each row of
the mixed run equal to that row alone on its adapter, and the unmerged run equal to the merged one."""

import json

import pytest
from click.testing import CliRunner

from catfast.cli import main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]


def test_bench_serve_tiny_flux_reports_switch_mixed_and_launch_ops():
    args = ["bench", "serve", "--model", "tiny-flux", "--resident", "1,3", "--mixed", "1,2", "--batch", "2",
            "--steps", "2", "--size", "16", "--reps", "2", "--json"]  # fmt: skip
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["model"], result["threads"], result["settings"]["resident"]) == ("tiny-flux", 1, [1, 3])
    sw = result["switch_ms"]
    for key in ("resident", "pool", "cold_host", "cold_disk", "run_ms"):
        assert set(sw[key]) == {"1", "3"} and all(v > 0 for v in sw[key].values()), key
    assert sw["pool"]["3"] <= sw["resident"]["3"] and sw["flat"]["max_ms"] == max(sw["resident"].values())
    mixed = result["mixed"]
    assert set(mixed["median_ms"]) == {"n1", "n2", "one_resident", "merged", "base"}
    assert mixed["ratio_1"] == 1.0 and mixed["ratio_2"] > 0 and mixed["unmerged_vs_merged"] > 0
    # the mixed rows equal each alone; the unmerged adapter equals it merged into the weights
    assert mixed["max_rel_err_vs_alone"] <= 1e-3
    assert mixed["merged_rel_err"] <= 1e-3 and mixed["one_resident_rel_err"] <= 1e-3
    ops = result["launch_ops"]
    assert ops["merged"] > 0 and ops["unmerged"] >= ops["merged"] and ops["host_syncs"] == 0
    assert ops["unmerged_2_resident"] >= ops["unmerged"] and ops["mixed_2_rows_2"] > 0


def test_bench_serve_refuses_options_of_the_other_kind():
    out = CliRunner().invoke(main, ["bench", "serve", "--model", "tiny-flux", "--requests", "3"])
    assert out.exit_code != 0 and "--requests" in out.output and "DiT" in out.output
    out = CliRunner().invoke(main, ["bench", "serve", "--model", "tiny", "--resident", "1"])
    assert out.exit_code != 0 and "--resident" in out.output
