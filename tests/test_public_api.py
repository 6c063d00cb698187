"""The public surface: `import patchdp` is light and exports every public name, each
documented in the README's API section, whose code blocks run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import patchdp
from patchdp import bookkeeping

README = Path(__file__).resolve().parent.parent / "README.md"


def api_section() -> str:
    text = README.read_text()
    start = text.index("## Python API")
    return text[start:text.index("\n## ", start + 1)]


def test_import_patchdp_is_light_and_loads_names_on_first_use():
    code = ("import sys, patchdp; heavy = [m for m in ('jax', 'scipy', 'optax') if m in sys.modules]; "
            "assert not heavy, heavy; patchdp.CropSpec; assert 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=README.parent)


def test_every_public_name_resolves_and_is_documented_in_the_readme():
    section = api_section()
    for name in patchdp.__all__:
        assert getattr(patchdp, name) is not None
        assert re.search(rf"\b{re.escape(name)}\b", section), f"{name} is not in the README's API section"
    from patchdp import accounting, sampling
    assert patchdp.FixedSizeSampling is sampling.FixedSizeSampling and patchdp.Ledger is accounting.Ledger
    assert not hasattr(accounting, "FixedSizeSampling")  # the sampling schemes have one home
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        patchdp.nope


def test_the_readme_api_examples_run_and_give_the_numbers_they_state():
    blocks = re.findall(r"```python\n(.*?)```", api_section(), re.S)
    assert len(blocks) >= 5
    scope = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 — our own README
    assert scope["p_star"] == pytest.approx(0.01461, abs=1e-5)
    assert scope["steps"] == 100_000 and scope["first"].indices.shape == (100,)
    assert scope["poisson"].padded_size == 178
    assert scope["eps"] == pytest.approx(0.336, abs=1e-3) and scope["low_eps"] == scope["eps"]
    assert scope["z"] == pytest.approx(0.896, abs=1e-3) and scope["low_z"] == scope["z"]
    assert scope["floor"] == pytest.approx(1.4e-8, rel=0.1) and scope["low_floor"] == scope["floor"]
    assert scope["eps"] < scope["opacus_eps"] < scope["image_eps"]
    # the loop written from the README trains, and its ledger's ε is the mechanism's own
    ledger, mechanism = scope["ledger"], scope["mechanism"]
    assert int(scope["state"].step) == 5 and scope["metrics"]["valid"] == 10 and scope["stats"]["valid"] == 10
    assert ledger.steps == 7 and ledger.epsilon() == mechanism.epsilon(7)
    # the NNX model trains through the same step, its two convolutions on the fast path
    assert int(scope["nnx_state"].step) == 1 and scope["nnx_metrics"]["valid"] == 10
    view = (scope["images"][0, :16, :16], scope["labels"][0, :16, :16])
    plan = bookkeeping.find_layers(lambda p, v: scope["nnx_loss"](p, *v), scope["nnx_params"], view)
    assert [layer.op.name for layer in plan.layers] == ["conv_general_dilated"] * 2
