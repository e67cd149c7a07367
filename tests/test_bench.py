"""The benchmark runs end to end and reports every figure (tiny batches: a smoke test, not a timing)."""
import json

import bench


def test_bench_reports_every_figure(tmp_path):
    out = str(tmp_path / "bench.json")
    assert bench.main(["--device", "cpu", "--batch-size", "4", "--sample-batch", "4", "--steps", "1",
                       "--repeats", "1", "--out", out]) == 0
    result = json.load(open(out))
    assert 2_000_000 <= result["parameters"] <= 2_600_000
    assert 0 < result["gflop_per_image_forward"] < result["gflop_per_image_train"]
    for precision in ("fp32", "bf16"):
        row = result[precision]
        assert row["matmul_gflops"] > 0 and row["train_images_per_s"] > 0 and row["sample_image_steps_per_s"] > 0
        assert row["train_fraction_of_matmul"] == row["train_gflops"] / row["matmul_gflops"]
