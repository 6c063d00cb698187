"""The DP step across 2 processes (jax.distributed, CPU collectives over gloo, 2 devices
each: a 4-device global mesh) equals the same step in one process on one device.

Follows the "Multi-host" recipe of patchdp/training.py: every process initialises
jax.distributed, builds the mesh over all 4 devices, uses the same seeds, loads only
the 4 examples its devices hold and assembles the global batch of 8 with
``jax.make_array_from_process_local_data``. tests/multiprocess_worker.py is the
program each process runs (and the reference run, without --coordinator).

Tolerance: one SGD step moves a parameter by η/B · (clipped sum + noise), each entry of
which is at most B·C + 5·z·C (each clipped per-example gradient has norm ≤ C; the noise
is N(0, (zC)²), same key, so the same bits). The two runs compute the same float32
operations in different orders (a per-device batch of 2 against 8, and the sum over
devices in a gloo all-reduce): a gradient entry sums at most a few hundred products
(2 crops × 12·12 positions of a 3×3 kernel), whose rounding error grows like
√288 ≈ 17 ulp when the order changes, so we allow 64 ulp (eps = 2⁻²³) of the update
scale, plus 2 ulp of the parameter for the rounding of the update itself: 2.5e-6.
Measured: 1.5e-8. A process loading the wrong rows, or the processes using different
keys, changed parameters by 1e-3 to 5e-3 (up to η·C/B = 0.025), far above it. The
counts (valid, nonfinite) and the clipped fraction must agree exactly: no example's
gradient norm lies within 1% of C = 2 (checked by re-running at C = 1.98 and 2.02).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
WORKER = TESTS / "multiprocess_worker.py"
TIMEOUT_S = 120
EPS = float(np.finfo(np.float32).eps)


def gloo_available() -> bool:
    """Whether this jaxlib has gloo CPU collectives (jax._src.lib._jax in jax 0.10,
    xla_extension before)."""
    from jax._src import lib
    return any(hasattr(getattr(lib, module, None), "make_gloo_tcp_collectives") for module in ("_jax", "xla_extension"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(commands: dict[str, tuple[list[str], dict]], logs: Path) -> None:
    """Runs the commands concurrently; fails with every log if one fails or they take
    longer than TIMEOUT_S. No process outlives this call."""
    procs, files = {}, {}
    try:
        for name, (args, env) in commands.items():
            files[name] = open(logs / f"{name}.log", "w")
            procs[name] = subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=TESTS.parent,
                                           stdout=files[name], stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if any(p.returncode for p in procs.values()):
                break  # a failed process leaves its peer waiting for it
            time.sleep(0.1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files.values():
            f.close()
    codes = {n: p.returncode for n, p in procs.items()}
    if any(codes.values()):
        report = "\n".join(f"--- {n} (exit {codes[n]}):\n{shorten((logs / f'{n}.log').read_text())}" for n in procs)
        pytest.fail(f"a worker failed or ran longer than {TIMEOUT_S} s (killed: exit -9):\n{report}")


def shorten(log: str, keep: int = 2500) -> str:
    """The start (a Python error) and the end (a native crash) of a long log."""
    return log if len(log) <= 2 * keep else f"{log[:keep]}\n[... {len(log) - 2 * keep} characters ...]\n{log[-keep:]}"


@pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no gloo CPU collectives "
                                                 "(make_gloo_tcp_collectives), which a multi-process CPU run needs")
def test_a_step_across_2_processes_equals_the_step_in_1_process(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    fast_compile = "--xla_backend_optimization_level=0"  # LLVM -O0: compiles in a fifth of the time
    two_devices = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {fast_compile}"}
    coordinator = f"127.0.0.1:{free_port()}"
    run_all({f"process{i}": ([str(tmp_path / f"process{i}.npz"), "--coordinator", coordinator,
                              "--num-processes", "2", "--process-id", str(i)], two_devices) for i in (0, 1)}
            | {"reference": ([str(tmp_path / "reference.npz")], {**env, "XLA_FLAGS": fast_compile})}, tmp_path)

    sys.path.insert(0, str(TESTS))
    try:
        import multiprocess_worker as w
    finally:
        sys.path.remove(str(TESTS))
    reference = np.load(tmp_path / "reference.npz")
    assert (reference["devices"], reference["processes"]) == (1, 1)
    scale = w.LEARNING_RATE / w.BATCH_SIZE * (w.BATCH_SIZE + 5 * w.NOISE_MULTIPLIER) * w.CLIP_NORM
    for i in (0, 1):
        result = np.load(tmp_path / f"process{i}.npz")
        assert (result["devices"], result["processes"]) == (4, 2)
        assert list(result["rows"]) == list(range(4 * i, 4 * i + 4)), "each process loads only its half"
        assert sorted(result.files) == sorted(reference.files)
        for name in (f for f in reference.files if f.startswith("param:")):
            tolerance = 64 * EPS * scale + 2 * EPS * np.abs(reference[name])
            error = np.abs(result[name] - reference[name])
            assert np.all(error <= tolerance), (
                f"process {i}: {name} differs from the 1-process step by up to {error.max():.3g} "
                f"(tolerance {tolerance.max():.3g})")
        assert result["metric:loss"] == pytest.approx(reference["metric:loss"], rel=64 * EPS)
        for name in ("metric:valid", "metric:nonfinite", "metric:clipped_fraction"):
            assert result[name] == reference[name], name
    assert reference["metric:valid"] == 7 and 0 < reference["metric:clipped_fraction"] < 1
