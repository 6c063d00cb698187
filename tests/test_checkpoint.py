"""Checkpoints: an exact round trip of the train state and its meta, pruning, and
atomicity — a half-written step is never listed nor restored — and a damaged newest
step (random bytes in tensorstore's data included) is skipped with one warning."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from patchdp.checkpoint import Checkpointer
from patchdp.training import TrainState

META = {"step": 3, "seeds": {"sampling": str(2**127 + 5), "secure": True, "key": [1, 2]}, "ledger": {"runs": [[1.5, 3]]}}


def state(seed=0):
    key = jax.random.key(seed)
    params = {"conv": {"kernel": jax.random.normal(key, (3, 3, 2, 4))}, "bias": jnp.arange(4.0)}
    optimizer = optax.adam(0.1)
    s = TrainState.create(params, optimizer)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = optimizer.update(grads, s.opt_state, params)
    return TrainState(optax.apply_updates(params, updates), opt_state, s.step + 1)


def assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_round_trip_is_exact(tmp_path):
    saved = state()
    with Checkpointer(tmp_path / "ck") as checkpoints:
        assert checkpoints.latest_step() is None
        checkpoints.save(3, saved, META)
    with Checkpointer(tmp_path / "ck") as checkpoints:  # a new process would do this
        assert checkpoints.latest_step() == 3
        restored, meta = checkpoints.restore(state(seed=1))
        raw, _ = checkpoints.restore()  # no target: nested dicts
    assert isinstance(restored, TrainState)
    np.testing.assert_array_equal(raw["params"]["conv"]["kernel"], saved.params["conv"]["kernel"])
    assert_equal(restored, saved)
    assert meta == META and int(meta["seeds"]["sampling"]) == 2**127 + 5


def test_keeps_the_newest_and_ignores_a_repeated_step(tmp_path):
    with Checkpointer(tmp_path, keep=2) as checkpoints:
        for step in (2, 4, 6):
            checkpoints.save(step, state(step), {"step": step})
        checkpoints.save(6, state(99), {"step": 99})  # already saved: left as it is
        assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 6]
        restored, meta = checkpoints.restore(state())
        assert meta == {"step": 6}
        assert_equal(restored, state(6))
        _, meta = checkpoints.restore(state(), step=4)
        assert meta == {"step": 4}


def test_a_half_written_step_is_neither_listed_nor_restored(tmp_path):
    with Checkpointer(tmp_path) as checkpoints:
        checkpoints.save(5, state(5), {"step": 5})
    # what a run killed while saving step 9 leaves behind: orbax's temporary folder
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    with Checkpointer(tmp_path) as checkpoints:
        assert checkpoints.latest_step() == 5
        restored, meta = checkpoints.restore(state())
    assert meta == {"step": 5}
    assert_equal(restored, state(5))


def test_restoring_nothing_is_an_error(tmp_path):
    with Checkpointer(tmp_path) as checkpoints, pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.restore(state())


def damage(folder, how):
    """What a full disk, a crash of the file system or a careless `rm` leaves behind."""
    if how == "truncated meta":
        path = folder / "meta" / "metadata"
        path.write_bytes(path.read_bytes()[:3])
    elif how == "missing state":
        shutil.rmtree(folder / "state")
    elif how == "random tensorstore bytes":  # what tensorstore answers with a bare Exception
        for path in folder.rglob("*"):
            if path.is_file() and "d" in path.relative_to(folder).parts:
                path.write_bytes(np.random.default_rng(0).bytes(max(path.stat().st_size, 64)))
    elif how == "no digests":  # saved by an older patchdp: orbax itself must find the damage
        (folder / "patchdp.sha256.json").unlink()
        damage(folder, "random tensorstore bytes")
    else:  # zero-byte files
        for path in folder.rglob("*"):
            if path.is_file():
                path.write_bytes(b"")


NO_LEFTOVER_READS = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize("how", [pytest.param(how, marks=NO_LEFTOVER_READS) for how in
                                 ("truncated meta", "missing state", "zero-byte files", "random tensorstore bytes")]
                         + ["no digests"])  # orbax's own failed read may leave "Event loop is closed" behind
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, how, capfd):
    with Checkpointer(tmp_path) as checkpoints:
        for step in (2, 4):
            checkpoints.save(step, state(step), {"step": step})
    damage(tmp_path / "4", how)
    with Checkpointer(tmp_path) as checkpoints:
        with pytest.warns(UserWarning, match=f"checkpoint {tmp_path / '4'} is damaged.*falling back") as caught:
            restored, meta = checkpoints.restore(state())
        assert meta == {"step": 2} and len(caught) == 1 and "\n" not in str(caught[0].message)
        assert_equal(restored, state(2))
        checkpoints.save(4, state(5), {"step": 4})  # resumed training reaches step 4 again: replaces it
        restored, meta = checkpoints.restore(state())
    assert meta == {"step": 4}
    assert_equal(restored, state(5))
    import gc
    gc.collect()  # a read left running past orbax's event loop would report "Event loop is closed" now
    assert "Traceback" not in capfd.readouterr().err


def test_no_readable_checkpoint_is_one_line_naming_it(tmp_path):
    with Checkpointer(tmp_path) as checkpoints:
        checkpoints.save(2, state(2), {"step": 2})
    damage(tmp_path / "2", "zero-byte files")
    with Checkpointer(tmp_path) as checkpoints, pytest.raises(ValueError) as error:
        checkpoints.restore(state())
    assert str(error.value) == (f"checkpoint {tmp_path / '2'} is damaged (patchdp.sha256.json is not JSON) "
                                "and no older checkpoint reads; it cannot be restored.")


def test_two_damaged_checkpoints_are_one_warning(tmp_path):
    with Checkpointer(tmp_path, keep=3) as checkpoints:
        for step in (2, 4, 6):
            checkpoints.save(step, state(step), {"step": step})
    damage(tmp_path / "6", "random tensorstore bytes")
    damage(tmp_path / "4", "missing state")
    with Checkpointer(tmp_path) as checkpoints, pytest.warns(UserWarning) as caught:
        _, meta = checkpoints.restore(state())
    assert meta == {"step": 2} and len(caught) == 1
    assert str(caught[0].message).endswith("falling back to the checkpoint of step 2.")
