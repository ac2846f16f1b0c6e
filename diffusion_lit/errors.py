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
