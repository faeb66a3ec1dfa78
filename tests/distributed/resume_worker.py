"""Crash and resume across 2 processes: RDropModel + anchor + BackupAndRestore.

Run by tests/test_multiprocess_resume.py, in two launches of both processes
(a real restart between them), on JAX (gloo CPU collectives, one CPU device
per process, process 0 the coordinator at localhost:PORT):

    python resume_worker.py OUT_DIR PHASE PROCESS_ID NUM_PROCESSES PORT

or on torch, under Keras' own DDP (Keras >= 3.16, gloo on CPU):

    python -m torch.distributed.run --nproc_per_node=2 \
        resume_worker.py OUT_DIR PHASE

PHASE `first` trains the uninterrupted run, then the run that crashes in the
middle of its second epoch (both processes raise at the same step, as a job
that is stopped: a process left alone would wait in a collective), with
`BackupAndRestore`. PHASE `resume` is the restarted job: other initial
weights, other seeds, and the same `BackupAndRestore`, which restores the
state saved at the end of the first epoch and trains on to the end.

Keras' `BackupAndRestore` (and `ModelCheckpoint`) have no notion of a chief
process: every process saves to the path it is given. Each process here has
its own backup directory, OUT_DIR/backup/process{P}, and so its own file.

The inner model has an unseeded `Dropout(0.3)`. On JAX its masks come from
its seed generator, whose replicated state every process holds; on torch
they come from torch's global generator (Keras' `torch.nn.functional.dropout`
path), seeded differently on each rank, as a job's ranks are.

After the resume, PHASE `resume` runs the control: the same resume from a
copy of the checkpoint, without restoring the state the masks are drawn from
(torch's generator on torch, the seed generator's state on JAX).

Each process writes OUT_DIR/{run}-process{P}.npz for the runs `uninterrupted`,
`resumed` and `control` (its own copy of every model variable, optimizer variable and
snapshot tensor, in order) and OUT_DIR/crashed-process{P}.json (the step of
the crash, the files of its backup directory and the torch generator keys of
its checkpoint).
"""

import json
import os
import shutil
import sys
import warnings

BACKEND = os.environ.setdefault("KERAS_BACKEND", "jax")

if BACKEND == "jax":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    # CPU collectives between processes (the default CPU client has none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
else:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_rdrop import RDropModel, ReferenceKLRegularizer  # noqa: E402
from keras_rdrop.src import rdrop_model, seed_state  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3  # per epoch
EPOCHS = 3
CRASH = (1, 1)  # (epoch, batch): the second batch of the second epoch
FEATURES, HIDDEN, CLASSES = 6, 16, 3


def data(process, processes):
    """This process's shard: its piece of every global batch, in order."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH * STEPS, FEATURES)).astype("float32")
    y = np.argmax(x @ rng.standard_normal((FEATURES, CLASSES)), -1).astype("int32")

    def shard(array):
        steps = array.reshape((STEPS, processes, -1) + array.shape[1:])
        return steps[:, process].reshape((-1,) + array.shape[1:])

    return shard(x), shard(y)


def rdrop(seed, process):
    """A fresh model: weights and dropout seed from `seed`, the same on every
    process; then torch's generator seeded per process (each rank its masks)."""
    keras.backend.clear_session()
    if BACKEND == "jax":
        # After clear_session, which resets the global distribution.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(auto_shard_dataset=False)
        )
        assert len(keras.distribution.list_devices()) == 2
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(HIDDEN, activation="relu"),
            keras.layers.Dropout(0.3),  # unseeded
            keras.layers.Dense(CLASSES),
        ]
    )
    model = RDropModel(inner, alpha=1.0)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if BACKEND == "torch":
        torch.manual_seed(1000 * seed + process)
    return model


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == CRASH:
            raise RuntimeError("simulated crash")


def fit(model, process, processes, callbacks):
    x, y = data(process, processes)
    model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH // processes,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5), *callbacks],
    )


def local(variable):
    """This process's copy of a variable (on JAX, not a gathered value)."""
    value = variable.value
    if hasattr(value, "addressable_data"):
        value = value.addressable_data(0)
    return np.array(keras.ops.convert_to_numpy(value))


def save_state(model, path):
    arrays = {}
    for group, variables in (
        ("model", model.variables),
        ("optimizer", model.optimizer.variables),
        ("snapshot", model.reference.ref_weights),
    ):
        for i, v in enumerate(variables):
            arrays[f"{group}_{i:03d}"] = local(v)
    np.savez(path, **arrays)


def torch_keys(backup):
    keys = []
    for name in sorted(os.listdir(backup)):
        if name.endswith(".h5"):
            with h5py.File(os.path.join(backup, name), "r") as f:
                f.visit(
                    lambda key: keys.append(key) if "seed_state_torch" in key else None
                )
    return keys


def first(out_dir, process, processes):
    model = rdrop(0, process)
    fit(model, process, processes, [])
    save_state(model, os.path.join(out_dir, f"uninterrupted-process{process}.npz"))

    backup = os.path.join(out_dir, "backup", f"process{process}")
    model = rdrop(0, process)
    try:
        fit(
            model,
            process,
            processes,
            [keras.callbacks.BackupAndRestore(backup), Crash()],
        )
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    else:
        raise AssertionError("the run did not crash")
    crashed = {
        "iterations": int(local(model.optimizer.iterations)),
        "distribution": type(keras.distribution.distribution()).__name__,
        "files": sorted(os.listdir(backup)),
        "torch_keys": torch_keys(backup),
    }
    with open(os.path.join(out_dir, f"crashed-process{process}.json"), "w") as f:
        json.dump(crashed, f)


def resume(out_dir, process, processes):
    backup = os.path.join(out_dir, "backup", f"process{process}")
    control = os.path.join(out_dir, "control", f"process{process}")
    shutil.copytree(backup, control)  # BackupAndRestore deletes its own
    model = rdrop(7, process)  # what a restarted job builds: other θ0 and seeds
    fit(model, process, processes, [keras.callbacks.BackupAndRestore(backup)])
    save_state(model, os.path.join(out_dir, f"resumed-process{process}.npz"))

    # The control: the same resume without restoring the state the masks are
    # drawn from (torch's generator on torch, the seed generator on JAX).
    if BACKEND == "torch":
        seed_state._restore_torch_generator_states = lambda store: None
    else:
        rdrop_model.load_seed_states = lambda model, store: None
    model = rdrop(7, process)
    fit(model, process, processes, [keras.callbacks.BackupAndRestore(control)])
    save_state(model, os.path.join(out_dir, f"control-process{process}.npz"))


def main():
    out_dir, phase, *rest = sys.argv[1:]
    if BACKEND == "jax":
        process, processes, port = (int(v) for v in rest)
        keras.distribution.initialize(
            job_addresses=f"localhost:{port}",
            num_processes=processes,
            process_id=process,
        )
    else:
        dist.init_process_group("gloo")
        process, processes = dist.get_rank(), dist.get_world_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (first if phase == "first" else resume)(out_dir, process, processes)
    if BACKEND == "jax":
        jax.distributed.shutdown()
    else:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
