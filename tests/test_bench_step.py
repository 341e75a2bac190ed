"""`python -m dino_jax.bench step` on the tiny config: the trainer's step, measured and reported."""

import math
import pathlib

from dino_jax.bench.step import main

TESTS = pathlib.Path(__file__).resolve().parent


def test_step_benchmark_reports_rate_flops_and_mfu(capsys):
    args = ["--config", str(TESTS / "helpers" / "fault_config.py"), "--batch", "16", "--steps", "2"]
    result = main([*args, "--warmup", "1"])
    assert result["batch"] == 16 and result["crops"] == "2x16 + 2x8"
    for key in ("step_ms", "images_per_s", "gflop_per_image", "matmul_tflops", "compile_s"):
        assert result[key] > 0, key
    assert math.isclose(result["images_per_s"], 16 / (result["step_ms"] / 1e3), rel_tol=1e-9)
    assert math.isclose(result["mfu"], result["tflops_per_device"] / result["matmul_tflops"])
    assert math.isfinite(result["loss"])
    assert '"images_per_s"' in capsys.readouterr().out  # the JSON line for scripts
