"""The floor under everything: the one error type for a user's mistake (`errors`), atomic file writes and free-space
messages (`files`), the trust rule for the class paths a checkpoint names and reading checkpoints without running
their pickles (`trust`), optional dependencies (`optional`) and the table of class paths that moved (`moved`).
Imports nothing from the rest of the package (the trust rule knows the parts it allows by name)."""
