"""Sparse training under the Hugging Face ``Trainer`` (``pip install transformers accelerate``,
or ``pip install '.[hf]'`` in the checkout).

:class:`SparseTrainingCallback` refreshes the masks of a :func:`transposable.nn.sparsify`-ed
model after every optimizer step that is due, sends each refresh's SAD through
``Trainer.log`` (so the console, TensorBoard, W&B and ``state.log_history`` all get it), and
keeps the refresher's state in the Trainer's checkpoints, so that a resumed run goes on
counting where it stopped. The masks themselves are buffers of the model, saved and restored
with its weights.
"""
from .nn import MaskRefresher

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as error:  # an optional extra: say which
    raise ImportError("transposable.hf needs transformers and accelerate: pip install transformers accelerate "
                      "(or pip install '.[hf]' in the transposable checkout)") from error

__all__ = ["SparseTrainingCallback"]


class SparseTrainingCallback(TrainerCallback, ExportableState):
    """Mask refreshes, SAD logging and refresher checkpoints for a ``Trainer``.

    Add it to a ``Trainer`` of a sparsified model before ``train()``. Do not also attach a
    :class:`~transposable.nn.MaskRefresher` to the optimizer: this callback is the refresher.

    Parameters
    ----------
    trainer : transformers.Trainer
        The trainer whose model was passed through ``sparsify`` (its ``log`` carries SAD).

    Attributes
    ----------
    refresher : MaskRefresher or None
        Made when training begins.

    Examples
    --------
    ::

        from transformers import Trainer
        from transposable.nn import sparsify
        from transposable.hf import SparseTrainingCallback

        trainer = Trainer(model=sparsify(model, "2:4"), args=args, train_dataset=data)
        trainer.add_callback(SparseTrainingCallback(trainer))
        trainer.train()          # logs "sad" and "sad_flips" at every refresh
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.refresher = None
        self._refreshed = 0  # refreshes logged so far

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.refresher = MaskRefresher(model if model is not None else self.trainer.model)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[-1] if saved else None
        refresher_state = ((saved or {}).get("attributes") or {}).get("refresher")
        if state.global_step > 0 and refresher_state is not None:  # resumed from a checkpoint
            self.refresher.load_state_dict(refresher_state)
        self._refreshed = len(self.refresher.history)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._refreshed = len(self.refresher.history)
        self.refresher.step()  # right after the weights changed, before the next forward
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # Logged here, not at the refresh: the Trainer counts the step (state.global_step,
        # the step of every log entry) between on_optimizer_step and on_step_end.
        if len(self.refresher.history) > self._refreshed:
            total = self.refresher.history[-1]["total"]
            self.trainer.log({"sad": total["fraction"], "sad_flips": total["flips"]})
        self._refreshed = len(self.refresher.history)
        return control

    def state(self):
        """What the Trainer keeps of this callback in ``trainer_state.json``."""
        return {"args": {}, "attributes": {"refresher": None if self.refresher is None else
                                           self.refresher.state_dict()}}
