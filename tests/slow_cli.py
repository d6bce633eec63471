"""``upq_hf.cli.main`` with pauses where a test wants to kill it (a script for tests/test_kill.py).

``UPQ_TEST_STEP_PAUSE=S``: sleep S seconds after each training step (before that step's checkpoint is
saved), so that a kill lands between two saves. ``UPQ_TEST_PAUSE_IN=save``: stop for good inside the final
save, once the model files are written; ``replace``: once the old output folder has been moved aside and
before the new one is renamed in. Nothing else differs from ``upq``.
"""

import os
import sys
import time


def _pause_steps(seconds: float) -> None:
    from transformers import TrainerCallback

    from upq_hf import distill

    class Pause(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(seconds)

    original = distill.UPQDistillTrainer.__init__

    def init(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), Pause()], **kwargs)

    distill.UPQDistillTrainer.__init__ = init


def _pause_in_save() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save(self, directory, *args, **kwargs):
        result = original(self, directory, *args, **kwargs)
        time.sleep(600)
        return result

    PreTrainedModel.save_pretrained = save


def _pause_in_replace() -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if ".old-" in os.path.basename(os.path.dirname(os.fspath(dst))):
            time.sleep(600)

    os.replace = replace


if __name__ == "__main__":
    if os.environ.get("UPQ_TEST_STEP_PAUSE"):
        _pause_steps(float(os.environ["UPQ_TEST_STEP_PAUSE"]))
    where = os.environ.get("UPQ_TEST_PAUSE_IN")
    if where == "save":
        _pause_in_save()
    elif where == "replace":
        _pause_in_replace()
    from upq_hf.cli import main

    sys.exit(main(sys.argv[1:]))
