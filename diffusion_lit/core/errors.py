"""The one exception type for a user's mistake, how an exception is put into one line, and one line to the user."""

import sys

from lightning.pytorch.utilities import rank_zero_only


class UserError(ValueError):
    """Bad input from the user (config value, missing data, unreadable checkpoint).

    The CLI prints its message, which says what is wrong and how to fix it, and exits non-zero without a traceback.
    """


def reason(err: BaseException) -> str:
    """`TypeName: first line of the message`, or the type name alone for an exception without a message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def say(message: str) -> None:
    """One line to the user on stderr, from the first process only (under DDP every rank runs the same code)."""
    if rank_zero_only.rank == 0:
        print(message, file=sys.stderr)


def build_optimizer(factory, parameters):
    """The optimizer of a config's `model.optimizer`; torch's own checks of its values (a negative learning rate,
    betas outside [0, 1), ...) become a UserError."""
    try:
        return factory(parameters)
    except ValueError as err:
        raise UserError(f"optimizer: {err}; fix it under model.optimizer.init_args in the config") from None


class LoadsClearly:
    """A module mixin: torch's "Error(s) in loading state_dict" (a checkpoint whose tensors do not fit the model its
    hyperparameters build) becomes a UserError naming the first mismatch."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__
            raise UserError(f"the checkpoint's tensors do not fit the {type(self).__name__} its hyperparameters build "
                            f"({detail[:300]}): the file is damaged or edited, or the settings given now (the config, "
                            "--model.* options) differ from the run's; use its own settings or another checkpoint") from None
