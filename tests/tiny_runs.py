"""The command line of a one-layer OPT run that takes seconds (for subprocess tests).

Run as a script, ``python tests/tiny_runs.py PAUSE_AT MARKER train.py ARGS...`` runs
``train.py ARGS...`` but, when the loop logs the training metrics of step ``PAUSE_AT``, it
creates the file ``MARKER`` and sleeps instead: a test can then kill the run at a known step.
"""

import os
import runpy
import sys
import time

# the tiny gated OPT narrowed to one layer, 3 steps (config overrides for in-process runs)
ONE_LAYER_OPT = (
    "--config.model.num_layers=1",
    "--config.model.hidden_size=32",
    "--config.model.num_heads=2",
    "--config.model.intermediate_size=64",
    "--config.data.seq_len=16",
    "--config.data.batch_size=8",
    "--config.train.steps=3",
    "--config.train.checkpoint_every=3",
    "--config.train.eval_every=0",
)

# a one-layer classification BERT (``model_config("bert-tiny", **ONE_LAYER_BERT)``)
ONE_LAYER_BERT = dict(
    head="classification",
    num_layers=1,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    vocab_size=99,
    max_positions=16,
)


def glue_ready() -> bool:
    """Whether the offline GLUE runs can run: the MiniLM package and ../shared's SST-2."""
    from configs import common
    from qtx.data.config import resolve_local_dir

    local = resolve_local_dir(None)
    return (
        bool(common.minilm_dir())
        and local is not None
        and (local / "glue" / "SST-2" / "train.tsv").is_file()
    )


def opt_train_cmd(workdir, steps, *, width=64, checkpoint_every=10, script="train.py"):
    """``python train.py`` of configs/opt125m_gated.py:tiny cut to one layer of ``width``."""
    return [
        sys.executable,
        script,
        "--config=configs/opt125m_gated.py:tiny",
        f"--workdir={workdir}",
        "--config.model.num_layers=1",
        f"--config.model.hidden_size={width}",
        "--config.model.num_heads=2",
        f"--config.model.intermediate_size={2 * width}",
        f"--config.data.seq_len={width // 2}",
        "--config.data.batch_size=8",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        f"--config.train.checkpoint_every={checkpoint_every}",
        "--config.train.max_eval_batches=2",
        "--config.train.tensorboard=False",
    ]


def paused_train_cmd(workdir, steps, pause_at, marker, **kw):
    """:func:`opt_train_cmd` that stops (sleeping, not exiting) at step ``pause_at`` and
    then creates ``marker``; the steps before it are done and logged."""
    cmd = opt_train_cmd(workdir, steps, **kw)
    return [cmd[0], os.path.abspath(__file__), str(pause_at), str(marker), *cmd[1:]]


def _run_paused(pause_at: int, marker: str, script: str, args: list[str]) -> None:
    from qtx.train.metrics import MetricWriter

    write = MetricWriter.write

    def write_or_pause(self, step, split, metrics):
        if split == "train" and step == pause_at:
            open(marker, "w").close()
            while True:
                time.sleep(60)
        return write(self, step, split, metrics)

    MetricWriter.write = write_or_pause
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    # the repository root (the script's directory) first, as for ``python train.py``
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[3]))
    _run_paused(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
