"""The checks every config runs, so that every error reads ``<key>=<value> <what is wrong>``;
callers prefix the key with its config node (``method.``, ``optim.``, ``data.``)."""

from __future__ import annotations

import math


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(name: str, value, minimum: int) -> None:
    """Raise ``ValueError("<name>=<value> must be an integer >= <minimum>.")`` unless it is one."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


def require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError("<name>=<value> is not one of ...")`` unless ``value`` is in ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def require_bool(name: str, value, spelled: str = "True or False") -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be {spelled}.")


def require_number(name: str, value, above: float | None = None, at_least: float | None = None) -> None:
    """A finite number ``> above`` or ``>= at_least``."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    if not ok:
        bound = f"> {above:g}" if above is not None else f">= {at_least:g}" if at_least is not None else ""
        raise ValueError(f"{name}={value!r} must be a number {bound}.".replace(" .", "."))
