"""benchmarks/accelerator.py: it imports and runs without dp_accounting and
tensorflow_datasets (the device image has neither), its --quick run passes its own
checks on CPU and writes the JSON and the table, and its checks and error bound fail
or count as derived."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accelerator  # noqa: E402

# Run in a fresh interpreter: the two packages cannot be imported, and the script must not need them.
HIDDEN = """
import sys
for name in ("dp_accounting", "tensorflow_datasets", "tensorflow"):
    sys.modules[name] = None  # `import name` now raises ImportError
sys.path.insert(0, "benchmarks")
"""


def python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in the repository root, importing this checkout's patchdp."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", HIDDEN + code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_imports_without_dp_accounting_and_tensorflow_datasets():
    done = python("import accelerator, patchdp\n"
                  "print(patchdp.__file__)\n"
                  "print(sorted(m for m in sys.modules if m.startswith(('dp_accounting', 'tensorflow'))))\n")
    where, loaded = done.stdout.splitlines()
    assert Path(where).is_relative_to(ROOT)
    assert loaded == "['dp_accounting', 'tensorflow', 'tensorflow_datasets']"  # only the blockers: all None


def test_quick_run_passes_its_checks_and_writes_json_and_table(tmp_path):
    out = tmp_path / "acc"
    python("import runpy\n"
           f"sys.argv = ['accelerator.py', '--quick', '--models', 'deeplabv3plus', '--out', {str(out)!r}]\n"
           "runpy.run_path('benchmarks/accelerator.py', run_name='__main__')\n")
    results = json.loads((out / "accelerator.json").read_text())
    assert results["meta"]["platform"] == "cpu" and results["meta"]["quick"]
    correctness = results["correctness"]
    assert correctness["passed"]
    assert len(correctness["checks"]) == 4 and all(c["passed"] for c in correctness["checks"])
    for check in correctness["checks"][:3]:  # the CPU against itself: the same program, bit for bit
        assert check["observed"] == 0.0 and 0 < check["bound"] < 0.1 * check["magnitude"]
        assert check["unclassified_primitives"] == []
    assert correctness["default_precision_relative_difference"] == 0.0
    arms = results["arms"]
    assert [row["arm"] for row in arms] == ["non-private", "DP book-keeping", "DP default", "DP per-example",
                                            "DP book-keeping, unrolled"]
    # The stand-in always runs in microbatches of 2 (unrolled on CPU), except where the default
    # schedule chooses: on CPU microbatches of ~8, here the whole batch of 8.
    assert [(row["microbatch_size"], row["loop"]) for row in arms] == [(2, "unrolled"), (2, "unrolled"), (8, None),
                                                                       (8, None), (2, "unrolled")]
    for row in arms:
        assert "error" not in row
        assert row["crop"]["sizes"] == [[33, 33]]
        assert row["compile_s"] > 0 and 1 <= len(row["step_s"]) <= 2 and row["step_s_min"] <= row["step_s_median"]
        assert math.isclose(row["images_per_s"], 8 / row["step_s_min"])
        assert row["xla_peak_bytes"] > 0 and row["device_memory"] == "n/a" and row["device_peak_bytes"] is None
        assert math.isclose(row["time_ratio"], row["step_s_min"] / arms[0]["step_s_min"])
        assert math.isclose(row["memory_ratio"], row["xla_peak_bytes"] / arms[0]["xla_peak_bytes"])
    assert results["skipped"] == []
    table = (out / "accelerator.md").read_text()
    assert "| model | arm |" in table and table.count("| deeplabv3plus |") == 5 and "| n/a |" in table
    assert "| deeplabv3plus | DP default | 8 |" in table and "| deeplabv3plus | non-private | 8 (2, unrolled) |" in table
    assert "- deeplabv3plus: stand-in: U-Net width 4, 1 level" in table
    assert ("- default schedule of deeplabv3plus / DP default, deeplabv3plus / DP per-example: cpu: microbatches of ~8"
            in table)


def test_arms_that_no_longer_fit_the_budget_are_skipped_and_listed():
    results = {"meta": {"device": "cpu", "platform": "cpu", "jax": jax.__version__, "quick": True, "commit": None,
                        "elapsed_s": 0.0}, "arms": [], "skipped": []}
    accelerator.speed(results, True, ["unet"], budget=0.0, started=time.perf_counter(), repeats=1, arm_seconds=1.0,
                      write=lambda: None)
    assert results["arms"] == []
    assert [row["arm"] for row in results["skipped"]] == ["non-private", "DP default", "DP book-keeping",
                                                          "DP per-example", "DP book-keeping, scan",
                                                          "DP book-keeping, unrolled"]
    assert "Skipped: unet / DP book-keeping, scan" in accelerator.markdown(results)


def test_error_bound_counts_contractions_reductions_elementwise_and_loops():
    u, bound = accelerator.UNIT_ROUNDOFF, accelerator.relative_error_bound
    gamma = lambda n: n * u / (1 - n * u)
    x, y = jnp.ones((2, 100)), jnp.ones((100, 3))
    assert bound(jax.make_jaxpr(jnp.matmul)(x, y)) == (gamma(100), [])
    image, kernel = jnp.ones((1, 5, 8, 8)), jnp.ones((4, 5, 3, 3))  # NCHW, OIHW: 5 channels × 3×3 window
    conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME")
    assert bound(jax.make_jaxpr(conv)(image, kernel)) == (gamma(45), [])
    assert math.isclose(bound(jax.make_jaxpr(lambda a: jnp.sum(a * a, axis=1))(x))[0], 8 * u + gamma(100))
    scan = lambda a: jax.lax.scan(lambda carry, row: (carry + row, None), jnp.zeros(100), a)[0]
    assert math.isclose(bound(jax.make_jaxpr(scan)(jnp.ones((10, 100))))[0], 8 * u + gamma(10))
    assert bound(jax.make_jaxpr(lambda a: jnp.max(a.T[::-1], axis=0))(x)) == (0.0, [])  # exact
    assert bound(jax.make_jaxpr(lambda a: jax.lax.cumprod(a, axis=1))(x)) == (8 * u, ["cumprod"])


def test_checks_fail_on_a_wrong_noise_std_and_on_one_wrong_example():
    noise = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    assert accelerator.noise_std_check(0.1 * noise, 0.1)["passed"]
    # 5% too much noise: the χ² interval at α = 1e-6 for d = 10⁴ is about ±3.5%.
    assert not accelerator.noise_std_check(0.105 * noise, 0.1)["passed"]
    clip_norm, batch, delta = 1.0, 16, 1e-3
    cpu = np.zeros(1000, np.float32)
    one_example = np.zeros(1000, np.float32)
    one_example[0] = clip_norm / batch  # one example's clipped gradient missing or doubled: C / B
    check = accelerator.difference_check("one example", cpu + one_example, cpu, delta, clip_norm)
    assert check["bound"] == 4 * delta * clip_norm and not check["passed"]
    assert accelerator.difference_check("rounding", cpu + 1e-7, cpu, delta, clip_norm)["passed"]
