"""The one crypto recipe: AES-256-GCM for feature values and device state, AES-GCM key wrapping, and
keyed pseudonyms. Nothing else in the project imports a primitive; it asks this module.

Every feature value is sealed under its device's data key with the row it belongs to bound in as
associated data (device, ownership, family, start_us), so a ciphertext copied into another device's,
family's or time's row does not open: it raises `TamperedCiphertext`, which names the row, never the
plaintext. A token is compact and self-describing::

    version (1) | data key id (4, big-endian) | nonce (12, random) | ciphertext + tag (16)

33 bytes over the plaintext. Nonces are random (96 bits), which is safe to about 2**32 seals a key;
keys are per device and ownership, far below that. Data keys are wrapped by a key-encryption key (KEK)
with the device, ownership and data key id as associated data, so a wrapped key moved to another row
does not unwrap.

```python
key = key_store.data_key("00000000000000a1", "owner-1")   # gateway.privacy.keys: a DataKey
token = key.seal(values_json, family="steps", start_us=start_us)
values_json = key.open(token, family="steps", start_us=start_us)
```
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEY_BYTES",
    "TOKEN_OVERHEAD",
    "TOKEN_VERSION",
    "CryptoError",
    "DataKey",
    "KekCipher",
    "KeyDestroyed",
    "PseudonymKey",
    "TamperedCiphertext",
    "UnwrapError",
    "device_pseudonym",
    "new_key",
    "new_key_id",
    "normalize_device",
    "normalize_ownership",
    "token_key_id",
    "wrap_aad",
]

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit GCM nonce, random per seal
TAG_BYTES = 16
TOKEN_VERSION = 1
_HEADER = struct.Struct(">BI")  # version, data key id
TOKEN_OVERHEAD = _HEADER.size + NONCE_BYTES + TAG_BYTES
WRAP_VERSION = 1
PSEUDONYM_HEX = 32  # 128 bits of HMAC-SHA256: collisions are out of reach for any fleet
MAX_OWNERSHIP = 128

# Domain labels: a value, a state blob, a wrapped key and a pseudonym never share associated data.
_RECORD_LABEL = b"bandgate.record.v1\x00"
_STATE_LABEL = b"bandgate.state.v1\x00"
_WRAP_LABEL = b"bandgate.datakey.v1\x00"
_KEK_ID_LABEL = b"bandgate.kek-id.v1"
_PSEUDONYM_LABEL = b"bandgate.pseudonym.v1\x00"

_DEVICE_HEX = re.compile(r"[0-9a-f]{16}")
_START_US = struct.Struct(">q")
_U64 = struct.Struct(">Q")


class CryptoError(Exception):
    """Something sealed cannot be opened, or a key cannot be used. Messages carry identifiers only."""


class TamperedCiphertext(CryptoError):  # noqa: N818 - names what happened to the row, as the issue does
    """A token that does not open under this key and row: edited, moved from another row (device,
    family or time), sealed under a key since destroyed, or not a token at all. Names the row it was
    read as; never the plaintext or the key."""

    def __init__(self, device_id: str, family: str, start_us: int | None, reason: str):
        self.device_id = device_id
        self.family = family
        self.start_us = start_us
        self.reason = reason
        where = f"device {device_id} {family}" + ("" if start_us is None else f" start_us {start_us}")
        super().__init__(f"ciphertext for {where} does not open: {reason}")


class KeyDestroyed(CryptoError):  # noqa: N818 - a state of the key (erased), not a bug
    """The data key was destroyed (erasure) or its key store closed: nothing more is sealed or opened."""


class UnwrapError(CryptoError):
    """A wrapped data key that does not unwrap: another KEK, or a wrapped key edited or moved."""


def new_key() -> bytes:
    """KEY_BYTES from the operating system's CSPRNG: a data key, a KEK or a pseudonym key."""
    return os.urandom(KEY_BYTES)


def new_key_id() -> int:
    """A random 32-bit data key id: a key recreated after an erasure never shares the destroyed key's id
    (but for a 2**-32 chance, which GCM's tag still catches)."""
    return int.from_bytes(os.urandom(4), "big")


def normalize_device(device_id: str | int) -> str:
    """The 16 lower-case hex digits records name a device by (`decoder.records.device_key`), from that
    string or the 64-bit ID, so one device always binds and pseudonymises the same way."""
    if isinstance(device_id, int) and not isinstance(device_id, bool):
        if not 0 <= device_id < 2**64:
            raise ValueError("a device ID is an unsigned 64-bit integer")
        return f"{device_id:016x}"
    if isinstance(device_id, str):
        lowered = device_id.lower()
        if _DEVICE_HEX.fullmatch(lowered):
            return lowered
    raise ValueError("a device ID is 16 hex digits or an unsigned 64-bit integer")


def normalize_ownership(ownership: str) -> str:
    """An ownership ID (who the device's data belongs to now): printable text, 1..MAX_OWNERSHIP chars."""
    if not (isinstance(ownership, str) and 0 < len(ownership) <= MAX_OWNERSHIP and ownership.isprintable()):
        raise ValueError(f"an ownership ID is printable text of 1..{MAX_OWNERSHIP} characters")
    return ownership


def _text(value: str) -> bytes:
    """Length-prefixed UTF-8, so concatenated fields can never be read two ways."""
    data = value.encode("utf-8")
    return struct.pack(">H", len(data)) + data


@lru_cache(maxsize=256)
def _family_aad(family: str) -> bytes:
    if not isinstance(family, str) or not 0 < len(family) <= 64 or not family.isprintable():
        raise ValueError("a family is printable text of 1..64 characters")
    return _text(family)


def wrap_aad(device_id: str | int, ownership: str, key_id: int) -> bytes:
    """Associated data binding a wrapped data key to its row: device, ownership and data key id."""
    device = bytes.fromhex(normalize_device(device_id))
    return _WRAP_LABEL + device + struct.pack(">I", key_id) + _text(normalize_ownership(ownership))


def token_key_id(token: bytes) -> int:
    """The data key id a token was sealed under (for a caller choosing among key generations)."""
    if len(token) < TOKEN_OVERHEAD:
        raise ValueError("too short to be a token")
    return _HEADER.unpack_from(token)[1]


class DataKey:
    """One device's data key under one ownership, unwrapped, ready to seal and open.

    Holds the AES-GCM object (built once: reusing it is what makes sealing every record cheap), never
    the key bytes as an attribute; its repr shows identifiers only, and it cannot be pickled or copied.
    Thread-safe. After `forget` (the key store does this on destroy) it refuses with KeyDestroyed."""

    __slots__ = (
        "__weakref__",
        "_aead",
        "_header",
        "_record_prefix",
        "_state_aad",
        "device_id",
        "key_id",
        "ownership",
    )

    def __init__(self, device_id: str | int, ownership: str, key_id: int, key: bytes):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes")
        if type(key_id) is not int or not 0 <= key_id < 2**32:
            raise ValueError("a data key id is an unsigned 32-bit integer")
        self.device_id = normalize_device(device_id)
        self.ownership = normalize_ownership(ownership)
        self.key_id = key_id
        self._aead: AESGCM | None = AESGCM(key)
        self._header = header = _HEADER.pack(TOKEN_VERSION, key_id)
        row = header + bytes.fromhex(self.device_id) + _text(self.ownership)
        self._record_prefix = _RECORD_LABEL + row
        self._state_aad = _STATE_LABEL + row

    def __repr__(self) -> str:
        state = "" if self._aead is not None else ", destroyed"
        ids = f"device={self.device_id!r}, ownership={self.ownership!r}, key_id={self.key_id:#010x}"
        return f"DataKey({ids}{state})"

    def __reduce__(self) -> object:
        raise TypeError("a DataKey is not serialisable: store it wrapped (KeyStore), never in the clear")

    def __copy__(self) -> DataKey:
        raise TypeError("a DataKey is not copied: share the one object")

    def __deepcopy__(self, memo: object) -> DataKey:
        raise TypeError("a DataKey is not copied: share the one object")

    @property
    def destroyed(self) -> bool:
        """True once `forget` ran: the key store destroyed it or closed."""
        return self._aead is None

    def forget(self) -> None:
        """Drop the cipher, so no holder of this object seals or opens again (erasure, close)."""
        self._aead = None

    def _cipher(self) -> AESGCM:
        aead = self._aead
        if aead is None:
            raise KeyDestroyed(f"data key {self.key_id:#010x} of device {self.device_id} was destroyed")
        return aead

    def seal(self, plaintext: bytes, *, family: str, start_us: int) -> bytes:
        """A token for `plaintext` (a record's values) bound to this device and the row (family, start_us)."""
        aead = self._cipher()
        nonce = os.urandom(NONCE_BYTES)
        aad = self._record_prefix + _family_aad(family) + _pack_start(start_us)
        return self._header + nonce + aead.encrypt(nonce, plaintext, aad)

    def open(self, token: bytes, *, family: str, start_us: int) -> bytes:
        """The plaintext `seal` took for this row; TamperedCiphertext if the token is not this row's."""
        aad = self._record_prefix + _family_aad(family) + _pack_start(start_us)
        return self._open(token, aad, family, start_us)

    def records_opener(self) -> Callable[[str, int, bytes], bytes]:
        """`open` for many rows, `(family, start_us, token)`, as a page of records needs it: the family's
        part of the associated data built once, a well-formed token of this key checked by its header
        alone. Anything else takes `open`'s path and its exact error; a destroyed key refuses at once."""
        header, start, prefix = self._header, _HEADER.size, self._record_prefix
        body = start + NONCE_BYTES
        families: dict[str, bytes] = {}
        pack_start = _START_US.pack

        def open_one(family: str, start_us: int, token: bytes) -> bytes:
            aead = self._aead
            fam = families.get(family)
            if aead is None or fam is None or token[:start] != header or len(token) < TOKEN_OVERHEAD:
                if fam is None and aead is not None and len(families) < 64:  # the families a page has
                    families[family] = prefix + _family_aad(family)
                return self.open(token, family=family, start_us=start_us)
            try:
                return aead.decrypt(token[start:body], token[body:], fam + pack_start(start_us))
            except (InvalidTag, struct.error, OverflowError):
                return self.open(token, family=family, start_us=start_us)  # its precise error

        return open_one

    def seal_state(self, plaintext: bytes) -> bytes:
        """A token for the device's streaming state blob, bound to (device, "state")."""
        aead = self._cipher()
        nonce = os.urandom(NONCE_BYTES)
        return self._header + nonce + aead.encrypt(nonce, plaintext, self._state_aad)

    def open_state(self, token: bytes) -> bytes:
        """The state blob `seal_state` took; TamperedCiphertext if it is another device's or edited."""
        return self._open(token, self._state_aad, "state", None)

    def _open(self, token: bytes, aad: bytes, family: str, start_us: int | None) -> bytes:
        aead = self._cipher()
        if not isinstance(token, bytes | bytearray | memoryview) or len(token) < TOKEN_OVERHEAD:
            raise TamperedCiphertext(self.device_id, family, start_us, "not a token (too short)")
        version, key_id = _HEADER.unpack_from(token)
        if version != TOKEN_VERSION:
            raise TamperedCiphertext(self.device_id, family, start_us, f"unknown token version {version}")
        if key_id != self.key_id:
            raise TamperedCiphertext(
                self.device_id,
                family,
                start_us,
                f"sealed under data key {key_id:#010x}, this device's key is {self.key_id:#010x} "
                "(moved from another device, or sealed under a key since destroyed)",
            )
        nonce = token[_HEADER.size : _HEADER.size + NONCE_BYTES]
        try:
            return aead.decrypt(nonce, token[_HEADER.size + NONCE_BYTES :], aad)
        except InvalidTag:
            raise TamperedCiphertext(
                self.device_id, family, start_us, "authentication failed (edited, or moved from another row)"
            ) from None


def _pack_start(start_us: int) -> bytes:
    try:
        return _START_US.pack(start_us)
    except struct.error:
        raise ValueError("start_us is a signed 64-bit integer") from None


class KekCipher:
    """A local key-encryption key: AES-256-GCM wrapping of data keys, with associated data (`wrap_aad`).

    Its `key_id` is a one-way fingerprint (HMAC of a fixed label), so a key store can tell "wrapped by
    another KEK" from "edited" without holding or printing the KEK. Wrapped: version | nonce | ct+tag."""

    __slots__ = ("_aead", "key_id")

    def __init__(self, kek: bytes):
        if not isinstance(kek, bytes) or len(kek) != KEY_BYTES:
            raise ValueError(f"a KEK is {KEY_BYTES} bytes")
        self._aead = AESGCM(kek)
        self.key_id = hmac.new(kek, _KEK_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"KekCipher(key_id={self.key_id!r})"

    def __reduce__(self) -> object:
        raise TypeError("a KEK is not serialisable")

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        """`data_key` encrypted under the KEK, bound to `aad`."""
        if len(data_key) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes")
        nonce = os.urandom(NONCE_BYTES)
        return bytes((WRAP_VERSION,)) + nonce + self._aead.encrypt(nonce, data_key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """The data key `wrap` took with the same `aad`; UnwrapError otherwise (another KEK or row)."""
        if len(blob) != 1 + NONCE_BYTES + KEY_BYTES + TAG_BYTES or blob[0] != WRAP_VERSION:
            raise UnwrapError(f"not a wrapped data key ({len(blob)} bytes, or an unknown version)")
        try:
            return self._aead.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise UnwrapError(
                f"wrapped data key does not unwrap under KEK {self.key_id} "
                "(wrapped by another KEK, or the row was edited or moved)"
            ) from None


class PseudonymKey:
    """The key behind device pseudonyms (erasure tombstones, pseudonymous audit keys); repr shows no key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a pseudonym key is {KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "PseudonymKey(<secret>)"

    def __reduce__(self) -> object:
        raise TypeError("a pseudonym key is not serialisable")

    def pseudonym(self, device_id: str | int) -> str:
        """See `device_pseudonym`."""
        message = _PSEUDONYM_LABEL + _U64.pack(int(normalize_device(device_id), 16))
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def device_pseudonym(key: PseudonymKey, device_id: str | int) -> str:
    """HMAC-SHA256 of the device ID, PSEUDONYM_HEX hex digits: the same device always gives the same
    pseudonym, so a tombstone can refuse a re-import and audit entries can be joined, while the ID
    itself cannot be recovered or confirmed without the key (a bare hash of a 64-bit ID could be)."""
    return key.pseudonym(device_id)
