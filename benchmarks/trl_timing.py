"""What the benchmarks need around TRL: a callback timing each step and logging its loss, and an
SFTTrainer that takes the dataset's rows in order (the same batches as the other loops)."""

from __future__ import annotations

import time


def step_timer(sync=lambda: None):
    """A TrainerCallback with ``times`` (seconds a step, ``sync``-ed before each reading) and ``losses``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Timer()


def in_order_trainer():
    """SFTTrainer with a sequential sampler: the rows in the order given."""
    from torch.utils.data import SequentialSampler
    from trl import SFTTrainer

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    return InOrder
