"""The age of digital consent by country: below it, nothing of the owner's is processed until a guardian's
consent is recorded (GDPR Art. 8 lets each member state set 13 to 16; COPPA sets 13 in the US).

The table is a default, not legal advice: an operator overrides it (`consent_ages = "FR=15,US=13"`) and
sets the age for every other country (`consent_age_default`, 16: the strictest GDPR value).
"""

from __future__ import annotations

from collections.abc import Mapping

# National implementations of GDPR Art. 8(1) as published by the member states; the UK (Data Protection
# Act 2018), Norway and the US (COPPA) likewise. Countries not listed get the configured default.
DIGITAL_CONSENT_AGE: Mapping[str, int] = {
    "AT": 14, "BE": 13, "BG": 14, "CY": 14, "CZ": 15, "DE": 16, "DK": 13, "EE": 13, "ES": 14,
    "FI": 13, "FR": 15, "GB": 13, "GR": 15, "HR": 16, "HU": 16, "IE": 16, "IS": 13, "IT": 14,
    "LI": 16, "LT": 14, "LU": 16, "LV": 13, "MT": 13, "NL": 16, "NO": 13, "PL": 16, "PT": 13,
    "RO": 16, "SE": 13, "SI": 15, "SK": 16, "US": 13,
}  # fmt: skip
DEFAULT_AGE = 16


def parse_ages(text: str) -> dict[str, int]:
    """`"FR=15, US=13"` → {"FR": 15, "US": 13}; ValueError naming the bad entry."""
    ages: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        country, sep, age = part.partition("=")
        country = country.strip().upper()
        if not sep or len(country) != 2 or not country.isalpha() or not age.strip().isdigit():
            raise ValueError(f"consent_ages: {part!r} is not COUNTRY=AGE (e.g. FR=15)")
        if not 0 < int(age) < 100:
            raise ValueError(f"consent_ages: {part!r}: the age is 1 to 99")
        ages[country] = int(age)
    return ages


class ConsentAges:
    """The age of digital consent for a country: the operator's override, the table, else the default."""

    def __init__(self, overrides: Mapping[str, int] | None = None, default: int = DEFAULT_AGE):
        self.table = {**DIGITAL_CONSENT_AGE, **(overrides or {})}
        self.default = default

    def age(self, country: str | None) -> int:
        return self.table.get(country or "", self.default)
