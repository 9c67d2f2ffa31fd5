"""Keys from a task's arguments: rendering ``lock=`` and ``dedup=`` templates or callables."""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery_resilience.errors import ConfigurationError

LockSpec = str | Callable[[Sequence[Any], Mapping[str, Any]], str]


def template_fields(template: str, what: str = "lock") -> list[str]:
    """Return the argument names a ``str.format`` template refers to, in order.

    ``"upload:{repoid}:{commit.sha}"`` gives ``["repoid", "commit"]``. Positional
    fields (``{}``, ``{0}``) are refused: a key must name its arguments.
    """
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigurationError(f"{what} template {template!r} is malformed: {exc}") from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        base = field.split(".", 1)[0].split("[", 1)[0]
        if not base or base.isdigit():
            raise ConfigurationError(
                f"{what} template {template!r} uses a positional field {{{field}}}: "
                "name the task's parameter instead, e.g. {repoid}"
            )
        names.append(base)
    return names


def template_pattern(template: str) -> re.Pattern[str]:
    """A pattern every key ``template`` renders matches in full: its text as written,
    any text for each field (``"upload:{repoid}"`` matches ``"upload:42"``). A key of
    another template may match too (``"{a}"`` matches every key)."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append("(?s:.*)")
    return re.compile("".join(parts))


def check_template(
    template: str, fun: Callable[..., Any], task_name: str, what: str = "lock"
) -> None:
    """Raise ``ConfigurationError`` if ``template`` names a parameter ``fun`` lacks.

    ``what`` is the option the template was given as (``"lock"``, ``"dedup"``).
    """
    params = inspect.signature(fun).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in template_fields(template, what):
        if name not in params and not takes_any:
            raise ConfigurationError(
                f"{what} template {template!r} of task {task_name!r} names {name!r}, "
                f"which is not a parameter of the task (parameters: {', '.join(params) or 'none'})"
            )


class LockKey:
    """Renders the lock (or dedup) key of one task from the arguments of each call.

    ``signature`` is the signature the body is called with (without ``self`` for a
    bound task), used to bind positional arguments to their names and fill defaults.
    ``what`` names the option in error messages (``"lock"``, ``"dedup"``).
    """

    def __init__(self, spec: LockSpec, signature: inspect.Signature, what: str = "lock") -> None:
        self._spec = spec
        self._signature = signature
        self._what = what

    def render(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Return the key for a call with ``args`` and ``kwargs``.

        Raises ``ConfigurationError`` when the arguments do not fit the task's
        signature or a callable returns something other than a non-empty string.
        """
        if callable(self._spec):
            key = self._spec(args, kwargs)
            if not isinstance(key, str) or not key:
                raise ConfigurationError(
                    f"{self._what} callable {self._spec!r} returned {key!r}: "
                    "expected a non-empty str"
                )
            return key
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ConfigurationError(f"cannot render {self._what} {self._spec!r}: {exc}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(name, {}))
        try:
            return self._spec.format_map(values)
        except (KeyError, AttributeError, IndexError) as exc:
            raise ConfigurationError(
                f"cannot render {self._what} {self._spec!r}: missing {exc}"
            ) from None
