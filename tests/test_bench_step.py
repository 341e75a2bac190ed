"""`python -m dino_jax.bench step` on the tiny config: the trainer's step measured pipelined and
synced, one JSON line per setting (--variant), a refused or failing setting reported in its
line while the others run, and --profile's grouping of the device time (dino_jax.bench.profile)
on a real trace and on a GPU-shaped one. No timing is asserted: only how the figures relate."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest

from dino_jax.bench import hlo_groups, profile, report
from dino_jax.bench import step as bench_step
from dino_jax.config import ConfigError

TESTS = pathlib.Path(__file__).resolve().parent
TINY = ["--config", str(TESTS / "helpers" / "fault_config.py"), "--batch", "16"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_each_setting_is_measured_pipelined_and_synced_and_the_profile_grouped(tmp_path, capsys):
    # base, a variant the CPU refuses (cuDNN attention), and a variant compiling the same
    # program (a logging key): it must start from a fresh state and reach the base's loss
    argv = [*TINY, "--steps", "2", "--warmup", "1", "--profile", str(tmp_path / "trace")]
    argv += ["--variant", "model.attention=cudnn", "--variant", "train.log_every_steps=5"]
    with pytest.raises(SystemExit) as status:
        bench_step.main(argv)
    assert status.value.code == 2  # a refused variant: a user error, after the others ran
    out = capsys.readouterr()
    assert "refused" in out.err and "needs an NVIDIA GPU" in out.err
    base, refused, variant = json_lines(out.out)

    assert [r["setting"] for r in (base, refused, variant)] == [
        "base",
        "model.attention=cudnn",
        "train.log_every_steps=5",
    ]
    for r in (base, variant):
        assert r["batch"] == 16 and r["crops"] == "2x16 + 2x8" and r["steps"] == 2
        assert r["config"] == "fault_config" and r["jax"] == jax.__version__
        assert r["device"] == f"{jax.device_count()} x {jax.devices()[0].device_kind}"
        for how in ("pipelined", "synced"):
            assert r[f"images_per_s_{how}"] > 0
            assert math.isclose(r[f"images_per_s_{how}"], 16e3 / r[f"step_ms_{how}"])
        assert math.isclose(r["mfu"], r["tflops_per_device"] / r["matmul_tflops"])
        assert r["gflop_per_image"] > 0 and r["xla_gflop_per_image"] > 0 and r["compile_s"] > 0
        assert r["peak_gib"] == "n/a" and r["xla_peak_gib"] > 0  # the CPU keeps no statistics
        assert math.isfinite(r["loss"])
    assert base["overrides"] == {"optim.batch_size": "16"}
    assert variant["overrides"] == {"optim.batch_size": "16", "train.log_every_steps": "5"}
    assert variant["command"].endswith(
        "--config.optim.batch_size=16 --config.train.log_every_steps=5"
    )
    assert math.isclose(variant["loss"], base["loss"], rel_tol=1e-6)
    assert refused["stage"] == "config" and "needs an NVIDIA GPU" in refused["error"]
    assert "images_per_s_pipelined" not in refused and "profile" not in variant

    # the tiny step's trace: the named scopes of train_step and the Flax module paths
    summary = json.loads((tmp_path / "trace" / "profile.json").read_text())
    groups = summary["groups"]
    assert set(groups) == set(hlo_groups.GROUPS)
    for group in ("augmentation", "attention", "optimizer+EMA", "head+loss", "matmul"):
        assert groups[group]["ms_per_step"] > 0, group
    assert math.isclose(sum(g["share"] for g in groups.values()), 1.0, rel_tol=1e-6)
    assert summary["top"] and all(r["group"] in hlo_groups.GROUPS for r in summary["top"])
    assert base["profile"]["shares"]["augmentation"] == pytest.approx(
        groups["augmentation"]["share"], abs=1e-4
    )
    # regrouped from the files it left (what `dino-jax-bench profile DIR` does)
    again = profile.main([str(tmp_path / "trace")])
    assert again["groups"].keys() == groups.keys()


def test_a_setting_failing_at_run_time_is_a_json_line_and_the_others_run(monkeypatch, capsys):
    def run(config, steps, warmup, profile_dir=None):
        if config.model.gelu == "tanh":
            raise RuntimeError("UNIMPLEMENTED: cuDNN refused the shape")
        return {"images_per_s_pipelined": 1.0, "drop_path": config.model.drop_path_rate}

    monkeypatch.setattr(bench_step, "run", run)
    argv = [*TINY, "--variant", "model.gelu=tanh", "--variant", "model.drop_path_rate=0.0"]
    with pytest.raises(SystemExit) as status:
        bench_step.main(argv)
    assert status.value.code == 1
    out = capsys.readouterr()
    base, failed, last = json_lines(out.out)
    assert base["drop_path"] == 0.1 and last["drop_path"] == 0.0  # each its own config
    assert failed["stage"] == "run" and "cuDNN refused the shape" in failed["error"]
    assert "RuntimeError" in failed["error"] and "Traceback" in out.err


def test_a_profiler_that_fails_leaves_the_measured_figures(monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("CUPTI could not be loaded")

    monkeypatch.setattr(profile, "profile_steps", refuse)
    result = bench_step.profiled(None, None, None, None, str(tmp_path))
    assert result == {"dir": str(tmp_path), "error": "RuntimeError: CUPTI could not be loaded"}
    assert "Traceback" in capsys.readouterr().err
    md = report.markdown([{"setting": "base", "config": "vit_small16", "profile": result}])
    assert "The profile of vit_small16 base failed: RuntimeError: CUPTI" in md


def test_variants_are_parsed_like_config_flags():
    assert bench_step.parse_variant("model.gelu=tanh, --config.aug.global_scale=(0.3, 1.0)") == [
        ("model.gelu", "tanh"),
        ("aug.global_scale", "(0.3, 1.0)"),
    ]
    # a comma starts an item only before a section.key=: a list value keeps its commas
    assert bench_step.parse_variant("eval.knn_ks=10,20,model.gelu=tanh") == [
        ("eval.knn_ks", "10,20"),
        ("model.gelu", "tanh"),
    ]
    for bad in ("", "model.gelu", "gelu=tanh", "=tanh", "model.gelu=tanh,aug.window"):
        with pytest.raises(ConfigError, match=r"section\.key=value"):
            bench_step.parse_variant(bad)


def test_a_misspelt_variant_exits_2_before_anything_is_compiled(monkeypatch, capsys):
    monkeypatch.setattr(bench_step, "run", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as status:
        bench_step.main([*TINY, "--variant", "model.gelu=tanh,model.remat_kind=dots"])
    assert status.value.code == 2
    err = capsys.readouterr().err
    assert "config.model.remat_kind is not a setting; did you mean --config.model.remat" in err
    assert "Traceback" not in err


def _scoped_step():
    """A jitted (state, batch, key) -> (state, metrics) function with the scopes of the real
    step: augmentation, a block's attention and qkv matmul, the optimizer."""

    def step(state, batch, key):
        with jax.named_scope("augment"):
            x = jnp.sin(batch) @ state
        with jax.named_scope("backbone/blocks_0/attn"):
            with jax.named_scope("qkv"):
                q = x @ state
            weights = jax.nn.softmax(q @ q.T)
            y = weights @ q
        with jax.named_scope("optimizer"):
            new = state - 0.1 * jnp.tanh(y.T @ y)
        return new, {"train/loss": y.sum()}

    return jax.jit(step)


def test_grouping_of_a_real_trace(tmp_path):
    state, batch = jnp.ones((128, 128)), jnp.ones((128, 128))
    compiled = _scoped_step().lower(state, batch, None).compile()
    ops = hlo_groups.hlo_ops(compiled.as_text())
    groups = {hlo_groups.group_of(op) for op in ops.values() if op.opcode not in ("parameter",)}
    assert {"augmentation", "attention", "matmul", "optimizer+EMA"} <= groups
    state, summary = profile.profile_steps(compiled, state, batch, None, tmp_path, steps=2)
    for group in ("augmentation", "attention", "matmul", "optimizer+EMA"):
        assert summary["groups"][group]["ms_per_step"] > 0, group


NET = "jit(train_step)/jvp(MultiCropNetwork)"
# A GPU program's HLO, cut down: a cuBLAS call, an unannotated fusion, a Triton GEMM fusion.
GPU_HLO = f"""HloModule jit_train_step, is_scheduled=true

%fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {{
  %p0 = f32[8]{{0}} parameter(0)
  %p1 = f32[8]{{0}} parameter(1)
  ROOT %add.1 = f32[8]{{0}} add(%p0, %p1), metadata={{op_name="jit(train_step)/augment/add"}}
}}

%fused_dot (p0.1: f32[8,8], p1.1: f32[8,8]) -> f32[8,8] {{
  %p0.1 = f32[8,8]{{1,0}} parameter(0)
  %p1.1 = f32[8,8]{{1,0}} parameter(1)
  ROOT %dot.1 = f32[8,8]{{1,0}} dot(%p0.1, %p1.1), lhs_contracting_dims={{1}}
}}

ENTRY %main.9 (a: f32[8,8], b: f32[8]) -> f32[8,8] {{
  %a = f32[8,8]{{1,0}} parameter(0)
  %b = f32[8]{{0}} parameter(1)
  %custom-call.3 = (f32[8,8]{{1,0}}, s8[0]{{0}}) custom-call(%a, %a),
    custom_call_target="__cublas$gemm",
    metadata={{op_name="{NET}/backbone/blocks_0/mlp/fc1/dot_general"}}
  %loop_add_fusion.2 = f32[8]{{0}} fusion(%b, %b), kind=kLoop, calls=%fused_add
  %gemm_fusion.4 = f32[8,8]{{1,0}} fusion(%a, %a), kind=kCustom, calls=%fused_dot,
    metadata={{op_name="{NET}/head/last_layer/dot_general"}}
  ROOT %copy.5 = f32[8,8]{{1,0}} copy(%a)
}}
""".replace(",\n    ", ", ")  # one instruction a line, as XLA prints them


def _gpu_trace() -> list[dict]:
    """A GPU trace as jax.profiler writes it: host and two device processes, CUDA streams, a
    derived "XLA Ops" line repeating the kernels' time."""

    def meta(pid, name, tid=None):
        kind = "process_name" if tid is None else "thread_name"
        return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}

    def kernel(pid, tid, ts, dur, name, **args):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}

    return [
        meta(1, "/host:CPU"),
        meta(2, "/device:GPU:0"),
        meta(3, "/device:GPU:1"),
        meta(2, "Stream #7(Compute)", 7),
        meta(2, "XLA Ops", 1),
        meta(3, "Stream #7(Compute)", 7),
        kernel(1, 5, 0, 50, "fusion.1", hlo_op="loop_add_fusion.2"),  # the host's launch
        kernel(2, 7, 0, 10, "sm90_xmma_gemm_bf16bf16_bf16f32", hlo_op="custom-call.3"),
        kernel(2, 7, 10, 4, "loop_add_fusion_2"),  # no annotation: the kernel's own name
        kernel(2, 7, 14, 3, "flash_fwd_kernel"),  # in no HLO: by its name
        kernel(2, 7, 17, 2, "Memcpy DtoD"),
        kernel(2, 7, 19, 6, "gemm_fusion_4", hlo_op="gemm_fusion.4"),
        kernel(2, 7, 25, 1, "copy_5", hlo_op="copy.5"),
        kernel(2, 1, 0, 26, "custom-call.3"),  # derived line: the same time again
        kernel(3, 7, 0, 100, "sm90_xmma_gemm_bf16bf16_bf16f32", hlo_op="custom-call.3"),
    ]


def test_grouping_of_a_gpu_trace_uses_the_first_device_s_kernels_and_the_hlo():
    rows = profile.op_times(_gpu_trace(), hlo_groups.hlo_ops(GPU_HLO))
    found = {r["op"]: (r["group"], r["us"]) for r in rows}
    assert found == {
        "custom-call.3": ("matmul", 10.0),
        "gemm_fusion.4": ("head+loss", 6.0),  # a matmul, but the head's
        "loop_add_fusion_2": ("augmentation", 4.0),  # no op_name: its fused add's scope
        "flash_fwd_kernel": ("attention", 3.0),
        "Memcpy DtoD": ("other", 2.0),
        "copy.5": ("other", 1.0),
    }
    summary = profile.summarize(_gpu_trace(), GPU_HLO, steps=2)
    assert summary["device_ms_per_step"] == pytest.approx(26 / 1e3 / 2)
    assert summary["groups"]["matmul"]["share"] == pytest.approx(10 / 26)
    # a Memcpy and a copy on the first device in 2 steps; the second device's gemm not counted
    assert summary["groups"]["other"]["kernels_per_step"] == 1.0
    assert summary["groups"]["matmul"]["kernels_per_step"] == 0.5


def test_cpu_trace_ops_are_one_device_s_and_nested_time_is_counted_once():
    def op(ts, dur, name, ordinal="0", tid=1):
        args = {"hlo_op": name, "device_ordinal": ordinal}
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}

    events = [
        op(0, 10, "while.1"),
        op(1, 4, "dot.2"),  # inside the while loop's span
        op(6, 3, "add.3"),
        op(0, 99, "dot.2", ordinal="1", tid=2),  # another device
        {"ph": "X", "pid": 1, "tid": 1, "ts": 20, "dur": 5, "name": "end: dot.2", "args": {}},
    ]
    assert [e["dur"] for e in profile.device_events(events)] == [10, 4, 3]
    assert profile.exclusive_us(profile.device_events(events)) == [3.0, 4.0, 3.0]


BLOCK = f"{NET}/backbone/blocks_3"


@pytest.mark.parametrize(
    ("scope", "opcode", "matmul", "group"),
    [
        (
            "jit(train_step)/augment/vmap(vmap(ox,yxc->yoc))/dot_general",
            "fusion",
            True,
            "augmentation",
        ),
        (f"{BLOCK}/attn/qkv/dot_general", "dot", True, "matmul"),
        (f"{BLOCK}/attn/vmap(BTNH,BSNH->BNTS)/dot_general", "dot", True, "attention"),
        (f"{BLOCK}/attn/reduce_max", "fusion", False, "attention"),
        (f"{BLOCK}/mlp/fc1/dot_general", "dot", True, "matmul"),
        (f"{BLOCK}/norm1/reduce_sum", "fusion", False, "norm+elementwise"),
        (f"{NET}/backbone/add", "all-reduce", False, "other"),
        (
            "jit(train_step)/transpose(jvp(MultiCropNetwork))/head/last_layer/dot_general",
            "dot",
            True,
            "head+loss",
        ),
        ("jit(train_step)/transpose(jvp(loss))/log_softmax", "fusion", False, "head+loss"),
        ("jit(train_step)/optimizer/sqrt", "fusion", False, "optimizer+EMA"),
        ("jit(train_step)/ema/mul", "fusion", False, "optimizer+EMA"),
    ],
)
def test_scopes_decide_the_group(scope, opcode, matmul, group):
    assert hlo_groups.group_of(hlo_groups.HloOp("op.1", opcode, scope, matmul=matmul)) == group


def test_the_report_is_a_markdown_table_with_failures_and_profile_shares():
    measured = {
        "setting": "base",
        "config": "vit_small16",
        "overrides": {"optim.batch_size": "128"},
        "command": "dino-jax-bench step --config=vit_small16 --config.optim.batch_size=128",
        "device": "1 x NVIDIA H200",
        "jax": "0.11.1",
        "images_per_s_pipelined": 2345.6,
        "images_per_s_synced": 2200.4,
        "mfu": 0.3312,
        "compile_s": 51.7,
        "peak_gib": 30.26,
        "xla_peak_gib": 28.1,
        "state_copy_mib": 167.2,
        "profile": {
            "shares": {"matmul": 0.5, "attention": 0.25, "augmentation": 0.25},
            "kernels_per_step": {"matmul": 74.0, "optimizer+EMA": 612.4},
        },
    }
    failed = {
        **{k: measured[k] for k in ("config", "device", "jax")},
        "setting": "model.attention=cudnn,model.attention_pad=8",
        "overrides": {"optim.batch_size": "128", "model.attention": "cudnn"},
        "command": "dino-jax-bench step --config=vit_small16 --config.model.attention=cudnn",
        "stage": "run",
        "error": "ValueError: cuDNN | refused\nsequence length 200",
    }
    text = "\n".join(["I1201 a log line", json.dumps(measured), json.dumps(failed), "{junk"])
    md = report.markdown(report.read_lines([text]))
    lines = md.splitlines()
    assert lines[0] == "| " + " | ".join(report.COLUMNS) + " |"
    assert lines[2].startswith("| 1 x NVIDIA H200 | 0.11.1 | vit_small16 | base | 128 |")
    assert "| **2,346** | 2,200 | 33.1% | 52 | 30.3 | 28.1 | 167 |" in lines[2]
    assert "failed (run): ValueError: cuDNN \\| refused sequence length 200" in lines[3]
    assert lines[3].count(" | ") == len(report.COLUMNS) - 1  # the pipe escaped, one row
    assert "| vit_small16 | base | 50.0% | 25.0% | 0.0% | 25.0% | 0.0% | 0.0% | 0.0% |" in md
    assert "| vit_small16 | base | 74 | 0 | 0 | 0 | 612 | 0 | 0 |" in md
