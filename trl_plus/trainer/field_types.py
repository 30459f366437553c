"""Config values of the wrong type are answered when the config is built, from the dataclass annotations.

`check_field_types(config)` checks every field annotated `bool`, `int` or `float`, or one of those `| None`: a bool
field takes True or False (a string such as "yes" is not a bool), an int field an int (1.5 is not), a float field an
int or a finite float (NaN compares False with every bound, so it would pass a range check and do nothing; inf is no
setting either). A bool is not an int or a float here: `max_steps=True` is a mistake, not 1. Other annotations
(unions with `str`, enums, lists, dicts) are left to the code that reads them: TRL and transformers accept several
forms there (`scale_rewards=True`, `report_to="all"`) and convert them in their own `__post_init__`.

>>> from dataclasses import dataclass
>>> @dataclass
... class Config:
...     steps: int = 1
...     rate: float | None = None
...     on: bool = False
>>> check_field_types(Config(steps=2, rate=1, on=True))
>>> check_field_types(Config(steps=1.5))
Traceback (most recent call last):
...
TypeError: `steps` is 1.5; valid: an int.
>>> check_field_types(Config(rate=float("nan")))
Traceback (most recent call last):
...
ValueError: `rate` is nan; valid: a finite float or None.
>>> check_field_types(Config(on="yes"))
Traceback (most recent call last):
...
TypeError: `on` is 'yes'; valid: True or False.
"""

import dataclasses
import functools
import math
import numbers
import types
import typing

_VALID = {bool: "True or False", int: "an int", float: "a finite float"}


def check_field_types(config) -> None:
    """Raise `TypeError` for a value of the wrong type in a simply annotated field, `ValueError` for a non-finite
    float; the message names the field, its value and what is valid."""
    for name, (kind, optional) in _simple_fields(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        valid = _VALID[kind] + (" or None" if optional else "")
        if not _has_kind(value, kind):
            raise TypeError(f"`{name}` is {value!r}; valid: {valid}.")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"`{name}` is {value!r}; valid: {valid}.")


def _has_kind(value, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # an int to Python, but True is no step count or rate
        return False
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


@functools.cache
def _simple_fields(config_class: type) -> dict[str, tuple[type, bool]]:
    """{name: (bool, int or float; whether None is valid)} for the init fields of `config_class` annotated with one of
    the three types or its `| None` form."""
    try:
        hints = typing.get_type_hints(config_class)
    except NameError:  # a subclass's forward reference that does not resolve: check the annotations that are types
        hints = {f.name: f.type for f in dataclasses.fields(config_class)}
    simple = {}
    for f in dataclasses.fields(config_class):
        annotation = hints.get(f.name)
        is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        members = typing.get_args(annotation) if is_union else (annotation,)
        kinds = [member for member in members if member is not type(None)]
        if f.init and len(kinds) == 1 and kinds[0] in _VALID:
            simple[f.name] = (kinds[0], len(kinds) < len(members))
    return simple
