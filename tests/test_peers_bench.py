"""The peer benchmark's own logic that needs no peer venv (benchmarks/peers/): the memory
probe against a known allocation, and the table's ratios against each framework's own
non-private step."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))
import protocol  # noqa: E402
import run  # noqa: E402


PROBE = """
import numpy as np, protocol
probe = protocol.PeakRSS()
probe.start()
block = np.ones(64 * protocol.MiB // 8)  # 64 MiB, touched, then freed before growth()
del block
print(probe.growth())
"""


def test_peak_rss_growth_sees_a_freed_allocation():
    # In a fresh process, as run.py measures: in this one, pages an earlier test freed but
    # the allocator kept resident could serve the block without raising the peak.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=PEERS, capture_output=True, text=True, check=True)
    assert 63 * protocol.MiB <= int(out.stdout) < 80 * protocol.MiB


def test_tables_divide_by_the_same_frameworks_non_private_step():
    results = {"unet": {"patchdp": {"seconds": [0.6, 0.5, 0.7], "memory": 30 * protocol.MiB,
                                    "xla": {"argument": 3 * protocol.MiB, "output": 2 * protocol.MiB,
                                            "temp": 10 * protocol.MiB, "alias": 2 * protocol.MiB}},
                        "jax": {"seconds": [0.25, 0.3], "memory": 10 * protocol.MiB, "xla": None},
                        "opacus-ghost": {"failed": "RuntimeError: unsupported"},
                        "torch": {"seconds": [0.1], "memory": 5 * protocol.MiB, "xla": None}}}
    text = run.format_tables(results, ["unet"], ["patchdp", "opacus-ghost", "torch", "jax"], microbatch=8)
    time_rows, memory_rows = (part.splitlines() for part in text.split("\n\n"))
    assert time_rows[2] == "| patchdp DP | 500 (600) | 2.00 |"  # min 0.5 s / JAX's min 0.25 s
    assert time_rows[3] == "| Opacus DP, ghost clipping | failed |  |"
    assert time_rows[4] == "| torch non-private | 100 (100) |  |"
    assert memory_rows[2] == "| patchdp DP | 30 | 3.00 | 13 |"  # XLA: 3 + 2 + 10 - 2 MiB
    assert memory_rows[3] == "| Opacus DP, ghost clipping | failed |  |  |"


@pytest.mark.parametrize("model", ["unet", "resnet18"])
def test_batches_are_reproducible_and_shaped_for_the_model(tmp_path, model):
    spec = run.MODELS[model]
    run.make_batch(spec, 4, False, tmp_path / "a.npz")
    run.make_batch(spec, 4, False, tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["images"].shape == (4,) + spec.image_shape and a["images"].dtype == np.float32
        assert a["labels"].shape == (4,) + (spec.image_shape[:2] if spec.per_pixel else ())
        assert 0 <= a["labels"].min() and a["labels"].max() < spec.classes
        np.testing.assert_array_equal(a["images"], b["images"])
