"""Several processes (jax.distributed, CPU collectives over gloo, 2 devices each: a
4-device global mesh): the DP step across 2 processes equals the same step in one process
on one device; `patchdp train` in 2 processes, one of them killed mid-run (the other stops
in one line within the peer timeout) and resumed in 2 processes, equals the 1-process run
(parameters to summation order, ledger and ε exactly, one set of run files); processes
given different configs all refuse before any step. (4 processes would add ~2 minutes of
a 2-core machine's time for nothing 2 do not show: the rows, the agreement and the
watchdog are written for any count; test_distributed covers the rest in one process.)

The step:

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

import json
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


def run_all(commands: dict[str, tuple[list[str], dict]], logs: Path, timeout: float = TIMEOUT_S) -> None:
    """Runs the commands (Python's arguments) concurrently; fails with every log if one
    fails or they take longer than ``timeout`` s. No process outlives this call."""
    procs, files = {}, {}
    try:
        for name, (args, env) in commands.items():
            files[name] = open(logs / f"{name}.log", "w")
            procs[name] = subprocess.Popen([sys.executable, *args], env=env, cwd=TESTS.parent,
                                           stdout=files[name], stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
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
        pytest.fail(f"a process failed or ran longer than {timeout} s (killed: exit -9):\n{report}")


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
    run_all({f"process{i}": ([str(WORKER), str(tmp_path / f"process{i}.npz"), "--coordinator", coordinator,
                              "--num-processes", "2", "--process-id", str(i)], two_devices) for i in (0, 1)}
            | {"reference": ([str(WORKER), str(tmp_path / "reference.npz")], {**env, "XLA_FLAGS": fast_compile})},
            tmp_path)

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


# ============================================================================ `patchdp train` in 2 processes
#
# The tiny run of tests/test_trainer.py (a U-Net of width 4 on 16x16 scenes, batch 8, Adam
# at η = 0.01, z = 1, C = 1), STEPS steps, 2 processes × 2 CPU devices against 1 process on
# 1 device. Tolerance: the runs differ only in summation order (per-device batches of 2
# against 8, gloo's all-reduce). Adam's update η·m/(√v + ε) is invariant to the scale of
# the gradient, so a relative error r of the gradient moves it by at most ~2·η·r; with
# r = 64 ulp as above, and 2 ulp of the parameter for the rounding of each update, T steps
# drift by at most T·(2·η·64·eps + 2·eps·|p|): 2.5e-5 for T = 40 and |p| ≤ 2. Measured:
# ~3e-8. A process loading other rows, or other keys, moves parameters by ~η = 1e-2 per step.

STEPS, PEER_TIMEOUT_S = 40, 10
# The kill must be seen within the peer timeout + one beat; the rest is this busy machine's slack.
KILL_BOUND_S = PEER_TIMEOUT_S + 1 + 15
needs_gloo = pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no gloo CPU collectives")


def train_env(devices: int, cache: Path) -> dict:
    fast_compile = "--xla_backend_optimization_level=0"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(TESTS.parent),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {fast_compile}",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def pod(*args, cache: Path) -> dict[str, tuple[list[str], dict]]:
    """`patchdp train ARGS` as process 0 and 1 of 2, 2 CPU devices each (run_all's commands)."""
    coordinator = f"127.0.0.1:{free_port()}"
    return {f"process{i}": (["-m", "patchdp.cli", "train", *args, "--coordinator", coordinator, "--num-processes",
                             "2", "--process-id", str(i), "--peer-timeout", str(PEER_TIMEOUT_S)], train_env(2, cache))
            for i in (0, 1)}


def popen(commands: dict[str, tuple[list[str], dict]]) -> dict[str, subprocess.Popen]:
    return {name: subprocess.Popen([sys.executable, *args], env=env, cwd=TESTS.parent, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for name, (args, env) in commands.items()}


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("patchdp: error:")]


@pytest.mark.slow  # ~2 minutes on 2 cores: 3 runs, 2 of them in 2 processes, and a peer timeout
@needs_gloo
def test_patchdp_train_in_2_processes_survives_a_kill_and_resumes_to_the_1_process_run(tmp_path, tiny):
    from patchdp.checkpoint import Checkpointer

    run = ["--config", str(tiny), "--steps", str(STEPS), "--checkpoint-every", "4", "--eval-every", "20"]
    one, two = tmp_path / "one", tmp_path / "two"
    cache = tmp_path / "cache"
    run_all({"reference": (["-m", "patchdp.cli", "train", *run, "--run-dir", str(one)], train_env(1, cache))},
            tmp_path, timeout=240)

    # 2 processes; process 1 is killed once a checkpoint is written: process 0 stops in one line.
    procs = popen(pod(*run, "--run-dir", str(two), cache=cache))
    try:
        deadline = time.monotonic() + 240
        while not any(p.name.isdigit() for p in (two / "checkpoints").glob("*")):
            assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline, (
                "no checkpoint before the run ended:\n" + shorten(procs["process0"].communicate(timeout=30)[1]))
            time.sleep(0.01)
        procs["process1"].kill()
        killed = time.monotonic()
        _, err = procs["process0"].communicate(timeout=KILL_BOUND_S + 30)
        waited = time.monotonic() - killed
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert procs["process0"].returncode == 1, shorten(err)
    assert error_lines(err) == [f"patchdp: error: process 1 of 2 has not been heard from for {PEER_TIMEOUT_S} s "
                                "(killed, crashed or hung); process 0 stops. Continue the run with the same command "
                                "and --resume RUN_DIR in every process."], shorten(err)
    assert waited < KILL_BOUND_S, f"process 0 took {waited:.1f} s to stop after process 1 was killed"
    assert not (two / "report.json").exists()

    # --resume in both processes continues exactly: the 1-process run's parameters and ledger.
    resumed = popen(pod("--resume", str(two), "--json", cache=cache))
    try:
        outputs = {name: p.communicate(timeout=240) for name, p in resumed.items()}
    finally:
        for p in resumed.values():
            p.kill()
            p.wait()
    for name, p in resumed.items():
        assert p.returncode == 0, f"{name}:\n{shorten(outputs[name][1])}"
    printed = json.loads(outputs["process0"][0])  # stdout holds the result alone (gloo's lines go to stderr)
    assert outputs["process1"][0] == ""  # process 0 alone prints
    with Checkpointer(one / "checkpoints") as checkpoints:
        reference, reference_meta = checkpoints.restore()
    with Checkpointer(two / "checkpoints") as checkpoints:
        resumed, meta = checkpoints.restore(reference)  # in the 1-process layout
    assert meta["step"] == reference_meta["step"] == STEPS and meta["ledger"] == reference_meta["ledger"]
    tolerance = STEPS * (2 * 1e-2 * 64 * EPS + 2 * EPS * 2.0)
    for a, b in zip(jax_leaves(reference["params"]), jax_leaves(resumed["params"])):
        assert np.abs(a).max() <= 2.0 and np.abs(a - b).max() <= tolerance, np.abs(a - b).max()
    report_one, report_two = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert report_two["privacy"] == report_one["privacy"] == printed["privacy"] and report_two["steps"] == STEPS
    # One set of run files, written by process 0: each step's record once, no probe left.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))


@needs_gloo
def test_processes_that_disagree_on_the_config_all_refuse_before_any_step(tmp_path, tiny):
    commands = pod("--config", str(tiny), "--run-dir", str(tmp_path / "run"), cache=tmp_path / "cache")
    commands["process1"][0].extend(["--learning-rate", "0.02"])
    procs = list(popen(commands).values())
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    expected = ("patchdp: error: process 1 of 2 sees a different config, dataset, plan or run directory "
                "than process 0; run the same command in every process, on files every process sees alike.")
    for p, log in zip(procs, logs):
        assert p.returncode == 2 and error_lines(log) == [expected], shorten(log)
    assert not (tmp_path / "run").exists()


def jax_leaves(tree) -> list[np.ndarray]:
    import jax
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
