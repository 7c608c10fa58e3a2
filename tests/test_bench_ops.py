"""`catfast bench ops --smoke --json` runs every entry on tiny shapes and reports each contestant's time
and rate, with the extension next to torch."""

import json

from click.testing import CliRunner

from catfast.cli import main


def test_bench_ops_smoke_json(one_thread):
    res = CliRunner().invoke(main, ["bench", "ops", "--smoke", "--json", "--reps", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["smoke"] and result["threads"] == 1
    for section in ("merge", "group_norm_silu", "cat_loss", "lora_gemm"):
        entries = result[section]
        assert {e["dtype"] for e in entries} == {"fp32", "bf16"}, section
        for e in entries:
            assert all(v["ms"] > 0 and v["rate"] > 0 for v in e["contestants"].values()), e
    fp32 = {s: [e for e in result[s] if e["dtype"] == "fp32"] for s in ("merge", "group_norm_silu", "cat_loss")}
    assert all("ext" in e["contestants"] and e["ext_speedup"] > 0 for s in fp32.values() for e in s)
    assert all(0 < e["of_plain_gemm_rate"]["torch"] for e in result["lora_gemm"])


def test_bench_ops_refuses_unknown_dtype():
    res = CliRunner().invoke(main, ["bench", "ops", "--smoke", "--dtypes", "fp8"])
    assert res.exit_code != 0 and "--dtypes must be" in res.output
