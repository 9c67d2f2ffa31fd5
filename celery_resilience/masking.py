"""Masking of dead letters' arguments: values whose names look like secrets, or are
named in ``resilience_dlq_mask_args``, shown as ``***``.

Shared by the CLI (``dlq ls``/``show``) and the web page, so both hide the same values.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from celery_resilience.deadletter import DeadLetter

MASK = "***"

SECRET_WORDS = frozenset(
    {"password", "passwd", "secret", "token", "apikey", "authorization", "cookie", "privatekey"}
)
"""Names containing one of these as a word, or two adjacent words (``api_key``,
``apiKey``, ``X-Api-Key``), singular or plural, are masked by default."""

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def looks_secret(name: str) -> bool:
    """Whether argument or key ``name`` looks like it holds a secret.

    Words are split at ``_``, ``-``, ``.``, spaces and camelCase, compared without
    case: ``db_password``, ``refreshToken``, ``X-Api-Key``, ``session_cookie`` match;
    ``tokenizer`` and ``monkey`` do not.
    """
    words = [w.lower() for w in _WORD.findall(name)]
    for i, word in enumerate(words):
        for joined in (word, word + "".join(words[i + 1 : i + 2])):
            if joined in SECRET_WORDS or joined.removesuffix("s") in SECRET_WORDS:
                return True
    return False


class _Masked(str):
    """``"***"`` in JSON and ``***`` (unquoted) in a repr."""

    def __repr__(self) -> str:
        return MASK


def _compact(text: str) -> str:
    return re.sub(r"[_\-.\s]", "", text.casefold())


class _Masking:
    """Which names are masked: those that look like secrets and those in ``names``."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = frozenset(n.casefold() for n in names)
        self._fragments = SECRET_WORDS | {_compact(n) for n in names}

    def hides(self, name: object) -> bool:
        return isinstance(name, str) and (name.casefold() in self._names or looks_secret(name))

    def may_hold(self, text: str) -> bool:
        """Whether text (a repr) mentions a masked name, loosely: errs on hiding."""
        compact = _compact(text)
        return any(fragment in compact for fragment in self._fragments)

    def value(self, value: Any) -> tuple[Any, bool]:
        """``value`` with every value under a masked key, at any depth, as ``***``;
        and whether anything was masked."""
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            hit = False
            for key, item in value.items():
                if self.hides(key):
                    out[key], masked = _Masked(MASK), True
                else:
                    out[key], masked = self.value(item)
                hit = hit or masked
            return out, hit
        if isinstance(value, list):
            pairs = [self.value(item) for item in value]
            return [item for item, _ in pairs], any(masked for _, masked in pairs)
        return value, False


def view(entry: DeadLetter, mask: frozenset[str], reveal: bool) -> dict[str, Any]:
    """The entry as JSON-ready data with every masked value replaced by ``"***"``.

    Masked are the values of arguments and dict keys (at any depth) whose names look
    like secrets (``looks_secret``) or are in ``mask``: positional args named by
    ``entry.argnames``, kwargs by key. When something was masked the reprs are
    rebuilt from the masked values. A raw body's reprs, and its base64 ``data``,
    cannot be masked: they are hidden when an argname is masked or a repr mentions
    a masked name. ``reveal`` returns every field as stored.
    """
    data = dataclasses.asdict(entry)
    if reveal:
        return data
    masking = _Masking(mask)
    names = entry.argnames or []
    if entry.body is not None or not isinstance(entry.args, list):
        reprs = f"{entry.args_repr} {entry.kwargs_repr}"
        if any(masking.hides(n) for n in names) or masking.may_hold(reprs):
            data["args_repr"] = data["kwargs_repr"] = MASK
            if isinstance(data.get("body"), dict):
                data["body"]["data"] = MASK
        return data
    shown: list[Any] = []
    hit = False
    for i, value in enumerate(entry.args):
        if i < len(names) and masking.hides(names[i]):
            shown.append(_Masked(MASK))
            hit = True
        else:
            value, masked = masking.value(value)
            shown.append(value)
            hit = hit or masked
    kwargs, masked = masking.value(entry.kwargs or {})
    if hit or masked:
        data["args"], data["args_repr"] = shown, repr(tuple(shown))
        if entry.kwargs is not None:
            data["kwargs"], data["kwargs_repr"] = kwargs, repr(kwargs)
    return data
