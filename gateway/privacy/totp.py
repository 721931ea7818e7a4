"""An owner's optional second factor: TOTP (RFC 6238, `pyotp`), asked for export, erasure and consent
changes once enrolled. A code is accepted for the current 30-s step or one step either side (clock
drift), and each step once: a replayed code, or an older one after a newer was used, is refused.

The secret is sealed under the ownership's data key (so an erasure destroys it with everything else)
and travels only in the enrolment answer, shown once.
"""

from __future__ import annotations

import hmac
import time

import pyotp

from gateway.privacy.crypto import DataKey

TOTP_FAMILY = "totp"  # associated-data label of a sealed secret
DRIFT_STEPS = 1
ISSUER = "bandgate"


class TotpRefused(Exception):  # noqa: N818 - an answer to the caller
    """A missing, wrong or replayed code; the message is safe to send back."""


def new_secret() -> str:
    """160 random bits, base32 (what authenticator apps expect)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, device: str) -> str:
    """The otpauth:// URI an authenticator app scans (holds the secret: shown once, never logged)."""
    return pyotp.TOTP(secret).provisioning_uri(name=device, issuer_name=ISSUER)


def seal_secret(key: DataKey, secret: str) -> bytes:
    return key.seal(secret.encode(), family=TOTP_FAMILY, start_us=0)


def unseal_secret(key: DataKey, sealed: bytes) -> str:
    return key.open(sealed, family=TOTP_FAMILY, start_us=0).decode()


def check(secret: str, code: str, last_step: int, now: float | None = None) -> int:
    """The time step `code` is valid for, if it is later than `last_step`; `TotpRefused` otherwise."""
    code = (code or "").strip()
    if not code:
        raise TotpRefused("a TOTP code is required: this owner enrolled a second factor")
    if not (code.isdigit() and len(code) == 6):
        raise TotpRefused("a TOTP code is 6 digits")
    totp = pyotp.TOTP(secret)
    step = totp.timecode(time.time() if now is None else now)
    window = range(step - DRIFT_STEPS, step + DRIFT_STEPS + 1)
    matched = [s for s in window if hmac.compare_digest(totp.generate_otp(s), code)]
    if not matched:
        raise TotpRefused("wrong TOTP code")
    used = max(matched)
    if used <= last_step:
        raise TotpRefused("this TOTP code was used already; wait for the next one")
    return used
