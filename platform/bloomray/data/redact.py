"""PII masking (``data.redact``): personal data becomes placeholders before any text is
tokenized or a tokenizer is trained on it, so it reaches neither the vocabulary nor the model.

Kinds and their placeholders, applied in this order (earlier kinds win overlaps):

- ``data.redact.patterns``, your own regexes -> ``<REDACTED>``
- ``email``: ``name@example.com`` -> ``<EMAIL>``
- ``ip``: IPv6 (checked with :mod:`ipaddress`, IPv4-mapped tails included), then IPv4 -> ``<IP>``
- ``phone``: ``+`` international numbers of 8-15 digits (``+44 20 7946 0958``,
  ``+1 (555) 123-4567``) and North American ``(555) 123-4567`` / ``555-123-4567`` /
  ``1-800-555-0199`` -> ``<PHONE>``
- ``digits``: runs of ``data.redact.min_digits`` or more digits (not the fraction or integer
  part of a decimal like ``3.14159265``), card numbers grouped in fours (Luhn-checked) and
  US SSNs (``123-45-6789``) -> ``<NUMBER>``

Emails go before digits and IPs before phones and digits, so an address is one placeholder,
not a mix. Years, versions (``1.2.3``), decimals and short counts stay as they are.

``prepare_data`` applies it to every text it reads (causal documents, classification rows,
SFT messages, eval files too) before a tokenizer is trained; the counts go to the data stats
(``summary.json`` ``data.redacted``). A tokenizer bloomray trains gets the placeholders as
whole tokens; a loaded one (a pretrained model's) sees them as plain text, since new tokens
would need new rows in that model's embeddings.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bloomray.config.schema import RedactConfig

KINDS = ("email", "ip", "phone", "digits")  # the built-in kinds, in the order they run
PLACEHOLDERS = {
    "pattern": "<REDACTED>",
    "email": "<EMAIL>",
    "ip": "<IP>",
    "phone": "<PHONE>",
    "digits": "<NUMBER>",
}

EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
IPV4 = re.compile(rf"(?<![\w.]){_IPV4}(?!\.?\d)(?!\w)")
_HEX = r"[0-9A-Fa-f]{1,4}"
IPV6 = re.compile(rf"(?<![\w:.])(?:(?:{_HEX})?:){{2,7}}(?:{_IPV4}|{_HEX})?(?![\w:.])")
PHONE = re.compile(
    r"(?<![\w+.])(?:"
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}"  # international; 8-15 digits checked
    r"|(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r")(?!\w|\.\d)"
)
_GROUPED = re.compile(r"(?<![\w-])(?:\d{3}-\d{2}-\d{4}|\d{4}([ -])\d{4}\1\d{4}\1\d{4})(?![\w-])")

# Given a match, (the match, text to keep after the placeholder), or None to leave it.
_Accept = Callable[[str], "tuple[str, str] | None"]


def _run_of_digits(min_digits: int) -> re.Pattern[str]:
    return re.compile(rf"(?<!\d)(?<!\d[.,])\d{{{min_digits},}}(?!\d)(?![.,]\d)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


class Redactor:
    """Replaces PII in text with placeholders and counts what it replaced, per kind.

    Args:
        kinds: built-in kinds to apply (any of :data:`KINDS`); they always run in that order.
        patterns: user regexes, applied first, each match replaced by ``<REDACTED>``.
        min_digits: the shortest digit run the ``digits`` kind replaces.
    """

    def __init__(
        self, kinds: Iterable[str] = KINDS, patterns: Sequence[str] = (), min_digits: int = 6
    ) -> None:
        wanted = set(kinds)
        unknown = wanted - set(KINDS)
        if unknown:
            raise ValueError(f"unknown redaction kinds {sorted(unknown)}; known: {list(KINDS)}")
        self.kinds = [k for k in KINDS if k in wanted]
        self.patterns = [re.compile(p) for p in patterns]
        self.digit_run = _run_of_digits(min_digits)
        self.counts: dict[str, int] = {k: 0 for k in (["pattern"] if patterns else []) + self.kinds}

    @classmethod
    def from_config(cls, rc: RedactConfig) -> Redactor | None:
        """The redactor ``data.redact`` asks for, or None when it is off."""
        return cls(rc.kinds, rc.patterns, rc.min_digits) if rc.enabled else None

    @property
    def placeholders(self) -> list[str]:
        """The placeholders this redactor can write (added to a tokenizer bloomray trains)."""
        return [PLACEHOLDERS[k] for k in self.counts]

    def __call__(self, text: str) -> str:
        for rx in self.patterns:
            text = self._sub("pattern", rx, text)
        if "email" in self.counts:
            text = self._sub("email", EMAIL, text)
        if "ip" in self.counts:
            text = self._sub("ip", IPV6, text, _ipv6)
            text = self._sub("ip", IPV4, text)
        if "phone" in self.counts:
            text = self._sub("phone", PHONE, text, _phone)
        if "digits" in self.counts:
            text = self._sub("digits", _GROUPED, text, _grouped)
            text = self._sub("digits", self.digit_run, text)
        return text

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """A conversation with every message's content redacted."""
        return [{**m, "content": self(m["content"])} for m in messages]

    def _sub(self, kind: str, rx: re.Pattern[str], text: str, accept: _Accept | None = None) -> str:
        placeholder = PLACEHOLDERS[kind]

        def replace(m: re.Match[str]) -> str:
            found = m.group()
            kept = accept(found) if accept else (found, "")
            if kept is None:
                return found
            self.counts[kind] += 1
            return placeholder + kept[1]

        return rx.sub(replace, text)


def redacted(redact: Redactor | None, texts: list[str]) -> list[str]:
    """``texts`` with PII replaced when ``data.redact`` is on (counted in the redactor)."""
    return [redact(t) for t in texts] if redact else texts


def placeholders(redact: Redactor | None) -> list[str]:
    """The tokens a tokenizer trained on redacted text adds whole (none without redaction)."""
    return redact.placeholders if redact else []


def redaction_stats(redact: Redactor | None) -> dict[str, dict[str, int]]:
    """``{"redacted": {kind: count}}`` for the data stats (summary.json), or {} when off."""
    return {"redacted": dict(redact.counts)} if redact else {}


def _ipv6(found: str) -> tuple[str, str] | None:
    """(address, trailing text) when ``found`` is an IPv6 address with two or more groups."""
    core, tail = (found[:-1], ":") if found.endswith(":") and not found.endswith("::") else (found, "")
    try:
        ipaddress.IPv6Address(core)
    except ValueError:
        return None
    groups = [g for g in core.split(":") if g]
    return (core, tail) if len(groups) >= 2 else None  # "::1", "[::2]" slices: not personal


def _phone(found: str) -> tuple[str, str] | None:
    if found.startswith("+") and not 8 <= sum(c.isdigit() for c in found) <= 15:
        return None
    return found, ""


def _grouped(found: str) -> tuple[str, str] | None:
    digits = re.sub(r"\D", "", found)
    return (found, "") if len(digits) == 9 or _luhn(digits) else None
