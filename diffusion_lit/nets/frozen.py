"""Pretrained parts that are read from their own files (an autoencoder, a CLIP text encoder): held like any module,
moved with the model, but not saved in its checkpoints."""

from torch import nn


def drop_saved(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: nothing of the frozen parts is written."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def keep_loaded(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint without the frozen parts keeps the ones already read."""
    for owner, part in module.named_modules():
        owner = prefix + (owner + "." if owner else "")
        for name, tensor in [*part.named_parameters(recurse=False), *part.named_buffers(recurse=False)]:
            if name not in part._non_persistent_buffers_set:  # what state_dict would hold
                state_dict.setdefault(owner + name, tensor.detach())


class Frozen(nn.ModuleDict):
    """A ModuleDict of frozen pretrained modules that a checkpoint neither holds nor needs."""

    def __init__(self, **modules: nn.Module) -> None:
        super().__init__(modules)
        for module in modules.values():
            module.requires_grad_(False)
        self.register_state_dict_post_hook(drop_saved)
        self.register_load_state_dict_pre_hook(keep_loaded)
