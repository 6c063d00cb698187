"""patchdp.distributed in one process: which launches count as several processes (the
flags, PATCHDP_* variables, SLURM, Open MPI, Cloud TPU), one-line refusals of
inconsistent flags, and a run of one process, where nothing starts and every helper is
the identity. The collectives themselves run in tests/test_multiprocess.py."""

import jax
import numpy as np
import pytest

from patchdp import distributed
from patchdp.distributed import Launch, Processes, detect

NO_TPU = dict(tpu_chips=lambda: 0)
SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}


def test_nothing_detected_is_one_process():
    assert detect(environ={}, **NO_TPU) is None
    assert detect("h:1", "1", "0", environ={}, **NO_TPU) is None  # one process: nothing to initialise


def test_flags_and_their_environment_variables():
    assert detect("host0:1234", "4", "2", environ={}, **NO_TPU) == Launch("host0:1234", 4, 2, "flags")
    env = {"PATCHDP_COORDINATOR": "h:9", "PATCHDP_NUM_PROCESSES": "2", "PATCHDP_PROCESS_ID": "1"}
    assert detect(environ=env, **NO_TPU) == Launch("h:9", 2, 1, "flags and PATCHDP_* variables")
    assert detect(process_id="0", environ=env, **NO_TPU).process_id == 0  # a flag wins over its variable
    assert detect("h:1", "2", "1", environ=SLURM, **NO_TPU).source == "flags"  # explicit wins over the cluster


@pytest.mark.parametrize("flags, message", [
    (("h:1", None, None), "missing: --num-processes (or PATCHDP_NUM_PROCESSES), --process-id"),
    ((None, "2", "0"), "missing: --coordinator (or PATCHDP_COORDINATOR)"),
    (("h:1", "2", "2"), "--process-id must be in 0 … 1 for --num-processes 2, got 2"),
    (("h:1", "0", "0"), "must be in 0 … -1"),
    (("h:1", "two", "0"), "--num-processes must be an integer, got 'two'"),
    (("h", "2", "0"), "--coordinator must be HOST:PORT"),
])
def test_inconsistent_flags_are_refused_in_one_line(flags, message):
    with pytest.raises(ValueError) as error:
        detect(*flags, environ={}, **NO_TPU)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_clusters_of_several_tasks():
    assert detect(environ=SLURM, **NO_TPU) == Launch(None, 8, 3, "SLURM")
    assert detect(environ={**SLURM, "SLURM_NTASKS": "1"}, **NO_TPU) is None  # one task: one process
    inside_sbatch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}  # a batch script, not srun
    assert detect(environ=inside_sbatch, **NO_TPU) is None
    mpi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}
    assert detect(environ=mpi, **NO_TPU) == Launch(None, 2, 1, "Open MPI")
    assert detect(environ={**mpi, "OMPI_COMM_WORLD_SIZE": "1"}, **NO_TPU) is None


def test_cloud_tpu_is_left_to_jax_detection():
    chips = dict(tpu_chips=lambda: 4)
    assert detect(environ={}, **chips) == Launch(None, None, None, "Cloud TPU VM")
    assert detect(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"}, **chips) == Launch(None, None, None, "Cloud TPU (GKE)")
    assert detect(environ={"TPU_WORKER_HOSTNAMES": "w0"}, **chips) is None


def test_one_process_starts_nothing_and_shares_as_itself():
    processes = distributed.start(None)
    assert processes == Processes(0, 1) and processes.writer
    assert processes.from_writer(lambda: "text") == "text" and processes.in_writer(lambda: [1]) == [1]
    with pytest.raises(FileNotFoundError):  # the writer's own error, unchanged
        processes.in_writer(lambda: open("/nonexistent/patchdp"))
    processes.agree("config", {"anything": 1})
    assert processes.all_true(True) == [] and processes.all_true(False) == [0]
    assert processes.anyone(True) and not processes.anyone(False)
    counts = np.arange(6, dtype=np.int64).reshape(2, 3) + 2**40
    np.testing.assert_array_equal(processes.gather_sum(counts), counts)
    processes.finish()
    processes.fail()
    assert not jax.distributed.is_initialized()


def test_local_rows_of_one_process_are_all_rows():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    np.testing.assert_array_equal(distributed.local_rows(sharding, 8), np.arange(8))
    batch = distributed.assemble(sharding, {"x": np.arange(8.0)})
    np.testing.assert_array_equal(batch["x"], np.arange(8.0))
