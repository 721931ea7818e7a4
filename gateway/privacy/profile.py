"""The owner's profile: birth year and country (whether the owner is a minor), height, weight and sex
(distance from steps). Versioned: a correction is a new version, and a record computed from the profile
names the version it used. Stored sealed under the ownership's data key (`seal`/`unseal`); a profile's
repr never shows a value."""

from __future__ import annotations

import datetime
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson

from gateway.privacy.crypto import DataKey

SEXES = ("female", "male", "other")
PROFILE_FAMILY = "profile"  # the associated-data label of a sealed profile (its version is the "time")
# Step length as a fraction of height (walking; Hatano 1993, used by most trackers): women 0.413, men
# 0.415; 0.414 when the sex is not given.
STRIDE_PER_HEIGHT = {"female": 0.413, "male": 0.415, None: 0.414, "other": 0.414}


class ProfileError(ValueError):
    """A profile field out of range; the message names the field, never the value."""


@dataclass(frozen=True)
class Profile:
    """What the owner tells about themselves; every field optional."""

    birth_year: int | None = None
    country: str | None = None  # ISO 3166-1 alpha-2, upper case
    height_cm: float | None = None
    weight_kg: float | None = None
    sex: str | None = None

    def __repr__(self) -> str:
        given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        return f"Profile(given={given})"

    def checked(self, today: datetime.date | None = None) -> Profile:
        """Self, or `ProfileError` naming the first field out of range."""
        year = (today or datetime.date.today()).year
        if self.birth_year is not None and not (_is_int(self.birth_year) and 1900 <= self.birth_year <= year):
            raise ProfileError(f"birth_year must be a year from 1900 to {year}")
        if self.country is not None and not (
            isinstance(self.country, str)
            and len(self.country) == 2
            and self.country.isascii()
            and self.country.isalpha()
            and self.country.isupper()
        ):
            raise ProfileError("country must be an ISO 3166-1 alpha-2 code (two upper-case letters)")
        for name, low, high in (("height_cm", 40.0, 260.0), ("weight_kg", 2.0, 400.0)):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and low <= value <= high
            ):
                raise ProfileError(f"{name} must be a number from {low:g} to {high:g}")
        if self.sex is not None and self.sex not in SEXES:
            raise ProfileError(f"sex must be one of {', '.join(SEXES)}")
        return self

    def merged(self, changes: dict[str, Any]) -> Profile:
        """A correction: this profile with `changes` applied (a None value clears a field)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ProfileError(f"unknown profile fields {sorted(unknown)}")
        return Profile(**{**asdict(self), **changes}).checked()

    def stride_m(self) -> float | None:
        """Step length from height (None without a height): what distance is computed with."""
        if self.height_cm is None:
            return None
        return round(self.height_cm / 100 * STRIDE_PER_HEIGHT.get(self.sex, 0.414), 4)

    def age_at_least(self, today: datetime.date | None = None) -> int | None:
        """The youngest the owner can be today from the birth year alone (born on 31 December): counted
        conservatively, so a minor is never taken for an adult. None without a birth year."""
        if self.birth_year is None:
            return None
        return max(0, (today or datetime.date.today()).year - self.birth_year - 1)

    def to_bytes(self) -> bytes:
        return orjson.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_bytes(cls, data: bytes) -> Profile:
        try:
            raw = orjson.loads(data)
            if not isinstance(raw, dict):
                raise TypeError
            return cls(**raw)
        except (orjson.JSONDecodeError, TypeError):
            raise ProfileError("not a profile") from None

    def to_dict(self) -> dict[str, Any]:
        """The given fields, for an export or the owner's own view."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def seal(key: DataKey, profile: Profile, version: int) -> bytes:
    """The profile sealed under the ownership's data key, bound to its version."""
    return key.seal(profile.to_bytes(), family=PROFILE_FAMILY, start_us=version)


def unseal(key: DataKey, sealed: bytes, version: int) -> Profile:
    """The profile `seal` made; `TamperedCiphertext` if it belongs to another device, ownership or
    version."""
    return Profile.from_bytes(key.open(sealed, family=PROFILE_FAMILY, start_us=version))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
