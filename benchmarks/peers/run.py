"""Peer benchmark: patchdp, jax-privacy and Opacus DP-SGD steps in one interleaved run.

    .venv/bin/python benchmarks/peers/run.py            # full run: 20-40 min on 2 shared cores
    .venv/bin/python benchmarks/peers/run.py --quick    # smoke run: tiny inputs, 2 rounds

Run it with the repository's virtual environment: that interpreter hosts the patchdp
and plain-JAX arms. The peers live in virtual environments of their own, created on
first use under benchmarks/peers/.venvs/ (git-ignored): ``jax-privacy`` (``pip install
jax-privacy flax``) and ``opacus`` (torch's CPU wheel, ``--torch-wheel``, plus ``opacus``).

One long-lived worker process per framework (worker_jax.py, worker_torch.py) holds
every arm of the current model, built on identical models (bench_step.py's flax U-Net
and ResNet-18 and their PyTorch twins), identical initial parameters and the identical
batch; parameter counts and initial losses must agree across arms, or the run stops.
After warm-up (compilation), the arms take turns step by step for ``--rounds`` rounds
(the order rotating each round), so load from other processes hits all alike; the
table gives each arm's fastest and median step, and the fastest over its own
framework's fastest non-private step. Memory: each arm once more in a fresh process
of its own, the peak resident-set growth during one step (protocol.PeakRSS), plus
XLA's compiled ``memory_analysis()`` for the JAX arms. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from protocol import MiB  # noqa: E402

TORCH_WHEEL = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


@dataclass(frozen=True)
class Model:
    title: str
    image_shape: tuple[int, int, int]  # (H, W, C)
    quick_image_shape: tuple[int, int, int]
    classes: int
    per_pixel: bool  # labels (H, W) per image, else one label per image


MODELS = {"unet": Model("U-Net", (64, 64, 3), (16, 16, 3), 4, True),
          "resnet18": Model("ResNet-18", (32, 32, 3), (8, 8, 3), 10, False)}


@dataclass(frozen=True)
class Arm:
    title: str
    worker: str  # key of WORKERS
    baseline: str | None  # the same framework's non-private arm


ARMS = {
    "patchdp": Arm("patchdp DP", "repo", "jax"),
    "patchdp-mb": Arm("patchdp DP, microbatch {microbatch}", "repo", "jax"),
    "jax-privacy": Arm("jax-privacy DP", "jax-privacy", "jax"),
    "opacus-hooks": Arm("Opacus DP, hooks", "torch", "torch"),
    "opacus-functorch": Arm("Opacus DP, functorch", "torch", "torch"),
    "opacus-ghost": Arm("Opacus DP, ghost clipping", "torch", "torch"),
    "torch": Arm("torch non-private", "torch", None),
    "jax": Arm("JAX non-private", "repo", None),
}

# worker -> (virtual environment under .venvs/ or None for this interpreter's, script)
WORKERS = {"repo": (None, "worker_jax.py"), "jax-privacy": ("jax-privacy", "worker_jax.py"),
           "torch": ("opacus", "worker_torch.py")}


def venv_packages(torch_wheel: str) -> dict[str, list[str]]:
    torch = torch_wheel if Path(torch_wheel).exists() else "torch"
    return {"jax-privacy": ["jax-privacy", "flax"], "opacus": [torch, "opacus"]}


def ensure_venv(name: str, packages: list[str]) -> Path:
    """The interpreter of .venvs/<name>, created and pip-installed with ``packages`` unless
    a previous run already did (its ``installed.txt`` lists the same packages)."""
    path = HERE / ".venvs" / name
    python, marker = path / "bin" / "python", path / "installed.txt"
    if python.exists() and marker.exists() and marker.read_text().split() == packages:
        return python
    print(f"creating {path} with {' '.join(packages)} (once; a few minutes)", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    marker.write_text("\n".join(packages))
    return python


class Worker:
    """One worker process, spoken to in protocol.py's line-JSON; stderr goes to ``log``."""

    def __init__(self, python: Path, script: str, log: Path, env: dict | None = None):
        self.log = log
        self.process = subprocess.Popen([str(python), str(HERE / script)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                        env=env, cwd=ROOT)

    def ask(self, op: str, **request) -> dict:
        """The worker's answer; raises RuntimeError with the worker's traceback if it failed."""
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker died; its log {self.log} ends with:\n"
                               + "\n".join(self.log.read_text().splitlines()[-20:]))
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(answer["error"])
        return answer

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def make_batch(model: Model, batch_size: int, quick: bool, path: Path) -> None:
    """A random batch, the same for every framework: N(0, 1) images (B, H, W, 3) float32
    and uniform labels (B, H, W) or (B,) int32, from numpy's generator seeded 0."""
    shape = model.quick_image_shape if quick else model.image_shape
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size,) + shape, dtype=np.float32)
    labels = rng.integers(0, model.classes, (batch_size,) + (shape[:2] if model.per_pixel else ()), dtype=np.int32)
    np.savez(path, images=images, labels=labels)


def check_same_function(model: str, prepared: dict[str, dict]) -> None:
    """Stops the run unless every arm has the same parameter count and initial loss."""
    lines = [f"  {arm:18s} {p['params']:>12,d} parameters, initial loss {p['initial_loss']:.6f}"
             for arm, p in prepared.items()]
    print(f"{MODELS[model].title}:\n" + "\n".join(lines), flush=True)
    counts = {p["params"] for p in prepared.values()}
    if len(counts) != 1:
        raise SystemExit(f"FAIL: the arms' {MODELS[model].title} have different parameter counts {sorted(counts)}; "
                         "the models are not identical (see worker_torch.py's twins)")
    losses = [p["initial_loss"] for p in prepared.values()]
    if max(losses) - min(losses) > 1e-4 * max(abs(x) for x in losses):
        raise SystemExit(f"FAIL: the arms' initial {MODELS[model].title} losses differ ({losses}): "
                         "the models, parameters or batch are not identical")


def time_arms(workers: dict[str, Worker], model: str, arms: list[str], options: dict, rounds: int,
              pause: float) -> tuple[dict, dict, dict]:
    """Prepares every arm of ``model``, checks they compute the same function, then runs
    ``rounds`` rounds, each arm one step per round. Returns per arm the step seconds,
    the prepare answers, and the errors of arms that failed."""
    prepared, failed = {}, {}
    for arm in arms:
        try:
            prepared[arm] = workers[ARMS[arm].worker].ask("prepare", arm=arm, model=model, **options)
        except RuntimeError as error:
            failed[arm] = str(error).strip().splitlines()[-1]
            print(f"  {arm}: FAILED to prepare: {failed[arm]}", flush=True)
    check_same_function(model, prepared)
    seconds = {arm: [] for arm in prepared}
    order = list(prepared)
    for r in range(rounds):
        for arm in order[r % len(order):] + order[:r % len(order)]:
            time.sleep(pause)  # let the previous worker's threads stop spinning
            seconds[arm].append(workers[ARMS[arm].worker].ask("step", arm=arm, model=model)["seconds"])
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{arm} {s[-1] * 1e3:.0f}" for arm, s in seconds.items())
              + " ms", flush=True)
    for arm in prepared:
        workers[ARMS[arm].worker].ask("release", arm=arm, model=model)
    return seconds, prepared, failed


def peak_memory(pythons: dict[str, Path], model: str, arm: str, options: dict, steps: int, log: Path) -> int:
    """Peak RSS growth (bytes) of one step of ``arm``, the largest over ``steps`` steps,
    in a fresh worker process with glibc's mmap threshold fixed at 64 KiB, so that every
    large buffer is mapped when allocated and unmapped when freed: the resident set then
    follows the live buffers, and no step reuses memory a previous one left resident."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    worker = Worker(pythons[ARMS[arm].worker], WORKERS[ARMS[arm].worker][1], log, env)
    try:
        worker.ask("prepare", arm=arm, model=model, **options)
        return max(worker.ask("step", arm=arm, model=model)["peak_rss_growth"] for _ in range(steps))
    finally:
        worker.close()


def xla_peak(xla: dict | None) -> float | None:
    """XLA's buffer-assigned peak: arguments + outputs + temporaries − donated (aliased)."""
    return None if xla is None else xla["argument"] + xla["output"] + xla["temp"] - xla["alias"]


def format_tables(results: dict, models: list[str], arms: list[str], microbatch: int) -> str:
    """The time table and the memory table, in Markdown.

    ``results[model][arm]``: ``seconds`` (list), ``memory`` (bytes or None), ``xla``
    (``memory_analysis`` fields or None), or ``failed`` (a message)."""
    def title(arm):
        return ARMS[arm].title.format(microbatch=microbatch)

    def ratio(model, arm, value):
        baseline = ARMS[arm].baseline
        own = results[model].get(baseline, {}) if baseline else {}
        mine = value(results[model][arm])
        return "" if not value(own) or mine is None else f"{mine / value(own):.2f}"

    def fastest(row):
        return min(row["seconds"]) if row.get("seconds") else None

    def memory(row):
        return row.get("memory")

    head = "| step | " + " | ".join(f"{MODELS[m].title} ms, min (median) | ÷ own non-private" for m in models) + " |"
    lines = [head, "|---|" + "---|---|" * len(models)]
    for arm in arms:
        cells = []
        for model in models:
            row = results[model][arm]
            if "failed" in row:
                cells += ["failed", ""]
            else:
                cells += [f"{fastest(row) * 1e3:.0f} ({statistics.median(row['seconds']) * 1e3:.0f})",
                          ratio(model, arm, fastest)]
        lines.append(f"| {title(arm)} | " + " | ".join(cells) + " |")
    lines += ["", "| step | " + " | ".join(f"{MODELS[m].title} peak RSS growth MiB | ÷ own non-private | XLA peak MiB"
                                           for m in models) + " |", "|---|" + "---|---|---|" * len(models)]
    for arm in arms:
        cells = []
        for model in models:
            row = results[model][arm]
            xla = xla_peak(row.get("xla"))
            cells += ["failed" if "failed" in row else "–" if memory(row) is None else f"{memory(row) / MiB:.0f}",
                      ratio(model, arm, memory), "" if xla is None else f"{xla / MiB:.0f}"]
        lines.append(f"| {title(arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="timed steps per arm, interleaved (default 8; --quick: 2)")
    parser.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)} (default: all; --quick: unet)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: U-Net only, batch 8, 16×16 inputs (ResNet-18: 8×8), 2 rounds, microbatch 4")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass (one process per arm)")
    parser.add_argument("--torch-wheel", default=TORCH_WHEEL, help="torch to install in the Opacus venv "
                        "(a wheel file; PyPI's torch if the file does not exist)")
    args = parser.parse_args()
    models = (args.models or ("unet" if args.quick else ",".join(MODELS))).split(",")
    arms = args.arms.split(",")
    for name, known in (("model", MODELS), ("arm", ARMS)):
        unknown = [x for x in (models if name == "model" else arms) if x not in known]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {', '.join(known)}")
    rounds = args.rounds or (2 if args.quick else 8)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    batch_size, microbatch = (8, 4) if args.quick else (32, 8)
    options = {"lr": 0.01, "microbatch_size": microbatch, "warmup": 1 if args.quick else 2}

    start = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc)
    data = ROOT / "benchmarks" / "results" / "peers" / stamp.strftime("%Y%m%dT%H%M%SZ")
    data.mkdir(parents=True)
    packages = venv_packages(args.torch_wheel)
    used = {ARMS[arm].worker for arm in arms} | {"repo"}  # repo: writes the initial parameters
    pythons = {w: Path(sys.executable) if WORKERS[w][0] is None else ensure_venv(WORKERS[w][0], packages[WORKERS[w][0]])
               for w in WORKERS if w in used}
    def git(*command):
        return subprocess.run(["git", "-C", str(ROOT), *command], capture_output=True, text=True).stdout.strip()

    commit = f"checkout {git('rev-parse', '--short', 'HEAD')}, patchdp/ last changed in {git('log', '-1', '--format=%h %s', '--', 'patchdp')}"
    dirty = git("status", "--porcelain", "--", "patchdp")
    print(f"{stamp:%Y-%m-%d %H:%M} UTC; {' '.join(sys.argv)}; {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.1f}; {commit}{' (patchdp/ modified)' if dirty else ''}; "
          f"batch {batch_size}, {rounds} rounds; logs and raw results in {data}", flush=True)

    # The memory pass's fresh JAX processes load the timing workers' executables from
    # this cache instead of compiling again.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(data / "jax-cache")
    workers = {w: Worker(pythons[w], WORKERS[w][1], data / f"{w}.log") for w in pythons}
    results = {}
    try:
        for w, worker in workers.items():
            print(f"worker {w}: {worker.ask('versions')}", flush=True)
        for model in models:
            make_batch(MODELS[model], batch_size, args.quick, data / f"batch_{model}.npz")
            workers["repo"].ask("init", model=model, data=str(data))
            seconds, prepared, failed = time_arms(workers, model, arms, {"data": str(data), **options}, rounds,
                                                  pause=0.1)
            results[model] = {arm: {"seconds": seconds[arm], "xla": prepared[arm]["xla"]} for arm in prepared}
            results[model].update({arm: {"failed": message} for arm, message in failed.items()})
            if not args.no_memory:
                for arm in prepared:
                    results[model][arm]["memory"] = peak_memory(
                        pythons, model, arm, {"data": str(data), **options}, steps=2, log=data / f"memory-{arm}.log")
                    print(f"  memory {arm}: {results[model][arm]['memory'] / MiB:.0f} MiB", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    (data / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; total {time.perf_counter() - start:.0f} s\n")
    print(format_tables(results, models, arms, microbatch))


if __name__ == "__main__":
    main()
