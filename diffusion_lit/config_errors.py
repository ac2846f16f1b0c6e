"""One line for jsonargparse's report on a part named wrongly in a config or on the command line (`--model.process
X`, a `class_path` in a YAML file): the option, what was given, and what to do."""

import collections.abc
import contextlib
import importlib
import inspect
import pkgutil
import re
import traceback
import typing

from torch import nn

from diffusion_lit.core.errors import reason
from diffusion_lit.core.moved import moved

# What jsonargparse's report on a part option says that we read: the option, the class path it was given (in one of
# the forms it echoes a value: `class_path 'X'`, `{'class_path': 'X', ...}`, `class_path='X'`, `Given value: X`) and
# an argument it refused; the rest we find out ourselves by importing that class path.
OPTION = re.compile(r'Parser key "([\w.]+)"')
GIVEN = re.compile(r"class_path(?:'?: | |=)'([\w.]+)'|(?:Given|Got) value: ([\w.]+)$|import path string: ([\w.]+)$",
                   re.MULTILINE)
PLAIN_MODULES = ("builtins", "pathlib", "typing", "datetime")  # plain values' types, not parts
REFUSED = re.compile(r"Option '(\w+)' is not accepted")


def part_mistake(message: str, typehints: dict) -> str | None:
    """One line for jsonargparse's report that a part option (`--model.process X`, a `class_path` in a config) names
    a class or module that does not exist, a module that fails to import, a class of another kind or an argument the
    class does not take; None for any other report. `typehints`: each option's type, by its key."""
    option, given = OPTION.match(message), GIVEN.search(message)
    if option is None or given is None:
        return None
    bases, factory_args = classes_in(typehints.get(option[1]))
    bases = tuple(b for b in bases if b.__module__ not in PLAIN_MODULES)
    if not bases:  # not a part option: a number, a string, a path (jsonargparse's own line says what it expected)
        return None
    fit = fitting(bases, factory_args)
    given = next(g for g in given.groups() if g)
    said = f"--{option[1]} {given}"
    if new := moved(given):  # the package's modules moved into subpackages
        return f"{said}: {given.rsplit('.', 1)[0]} moved: write {new}"
    choices = f"the classes that fit are {', '.join(fit)}" if fit else "give a class by its import path"
    if "." not in given:  # a short name: jsonargparse looks it up among the subclasses it knows
        given = next((path for path in fit if path.rsplit(".", 1)[1] == given), None)
        if given is None:
            return f"{said}: no such class; {choices}"
    module, name = given.rsplit(".", 1)
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module.split(".")[0]:  # the module named (not one it imports) is nowhere on sys.path
            return (f"{said}: Python cannot find the module {err.name}; run from the folder that holds {err.name}.py "
                    f"(or its package), or add that folder to PYTHONPATH" + (f" ({choices})" if fit else ""))
        if module == err.name or module.startswith(f"{err.name}."):
            return f"{said}: there is no module {err.name}; {choices}"
        return import_failed(said, module, err)
    except Exception as err:  # the user's module raises while it is imported
        return import_failed(said, module, err)
    cls = getattr(found, name, None)
    if cls is None:
        return f"{said}: {module} has no class {name}; {choices}"
    if inspect.isclass(cls) and not issubclass(cls, bases):
        return f"{said}: not a {' or '.join(b.__name__ for b in bases)}; {choices}"
    refused = REFUSED.search(message)
    takes = [p.name for p in list(signature(cls).values())[len(factory_args):]
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if refused and refused[1] not in takes:
        return (f"{said}: it takes no argument {refused[1]!r}; its arguments are {', '.join(takes) or 'none'} "
                f"(as --{option[1]}.init_args.NAME or under init_args in a config)")
    return None


def import_failed(said: str, module: str, err: BaseException) -> str:
    """The exception's one line and where it was raised: the user's module, or one it imports."""
    frame = (traceback.extract_tb(err.__traceback__) or [None])[-1]
    where = f" ({frame.filename}, line {frame.lineno})" if frame else ""
    return f"{said}: importing {module} failed with {reason(err)}{where}; fix that module"


def signature(cls) -> dict:
    """The parameters of a class's `__init__` (of a callable), by name; none where Python cannot tell them."""
    try:
        return dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return {}


def classes_in(typehint) -> tuple[tuple[type, ...], tuple]:
    """The classes an option's type takes a class path for (`Process | None`, `list[Callback]`, a factory
    `Callable[[int, int, int], nn.Module]`), and the types of the arguments such a factory is called with."""
    if inspect.isclass(typehint):
        return (typehint,), ()
    args = typing.get_args(typehint)
    if typing.get_origin(typehint) is collections.abc.Callable and args and isinstance(args[0], list):
        return classes_in(args[-1])[0], tuple(args[0])
    found = [classes_in(arg) for arg in args if arg is not type(None)]
    return tuple(c for classes, _ in found for c in classes), max((f for _, f in found), key=len, default=())


def fitting(bases: tuple[type, ...], factory_args: tuple = ()) -> list[str]:
    """diffusion_lit's classes (import paths) that fit an option of these base classes: their subclasses, or the bases
    themselves where they have none; for a factory, those whose first arguments are the factory's."""
    import diffusion_lit  # its modules, each imported (a config may name one that nothing imported yet: dit)

    for module in pkgutil.walk_packages(diffusion_lit.__path__, "diffusion_lit."):
        if "._" not in module.name:  # __main__ would run the command line again
            with contextlib.suppress(Exception):
                importlib.import_module(module.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    def takes_factory_args(cls) -> bool:
        first = list(signature(cls).values())[:len(factory_args)]
        return [p.annotation for p in first] in (list(factory_args), [t.__name__ for t in factory_args])  # or as text

    ours = [c for base in bases for c in subclasses(base) if c.__module__.startswith("diffusion_lit.")
            and not inspect.isabstract(c) and not c.__name__.startswith("_") and "<locals>" not in c.__qualname__
            and takes_factory_args(c)]
    if nn.Module in bases:  # a network is called as net(x_t, t, cond): not every module of ours is one
        ours = [c for c in ours if "x_t" in signature(c.forward)]
    ours = ours or [b for b in bases if b.__module__.startswith("diffusion_lit.")]
    return list(dict.fromkeys(f"{c.__module__}.{c.__qualname__}" for c in ours))
