"""A name -> function registry, so config validation and help text list exactly what is implemented."""

import inspect
from collections.abc import Callable


class Registry:
    """Maps names to functions.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("double")
    ... def double(x):
    ...     return 2 * x
    >>> LOSSES.get("double")(3)
    6
    >>> LOSSES.get("triple")
    Traceback (most recent call last):
    ...
    ValueError: Unknown loss 'triple'. Valid choices: ['double'].
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"A {self.kind} named '{name}' is already registered.")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(f"Unknown {self.kind} '{name}'. Valid choices: {self.names()}.")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def accepting(self, parameter: str) -> list[str]:
        """The names of the entries whose signature takes `parameter`: those `call_with_supported` passes it to.

        >>> LOSSES = Registry("loss")
        >>> _ = LOSSES.register("scaled")(lambda x, *, scale=1.0: scale * x)
        >>> _ = LOSSES.register("plain")(lambda x: x)
        >>> LOSSES.accepting("scale"), LOSSES.accepting("eps")
        (['scaled'], [])
        """
        return [name for name in self.names() if parameter in inspect.signature(self._entries[name]).parameters]


def call_with_supported(fn: Callable, *args, **hyperparameters):
    """Call `fn` with the positional `args` and only the keyword hyperparameters its signature names.

    The trainer holds one dict of every hyperparameter; each registered function declares which ones it uses.

    >>> def clip(x, *, eps):
    ...     return min(x, eps)
    >>> call_with_supported(clip, 5, eps=1, unused=2)
    1
    """
    accepted = inspect.signature(fn).parameters
    return fn(*args, **{name: value for name, value in hyperparameters.items() if name in accepted})
