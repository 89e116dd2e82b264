"""The command line of a one-layer OPT run that takes seconds (for subprocess tests)."""

import sys


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
