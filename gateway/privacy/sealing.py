"""Encryption at rest for the stores: the `Sealer` a store is given (gateway/store/base.py), backed by the
key store's per device × ownership data keys and the pseudonym key of erasure tombstones.

A value that does not open becomes `Unreadable` for the store, which skips it and reports it by
identifiers: its key was destroyed (an erased device: nothing of it can be read from then on), or the
ciphertext was moved from another device's, family's or time's row (tampering).
"""

from __future__ import annotations

from pathlib import Path

from gateway.privacy.crypto import CryptoError, PseudonymKey, device_pseudonym
from gateway.privacy.keys import (
    KEYS_DB,
    TOMBSTONE_FILE,
    KeyStore,
    KeyStoreError,
    load_kek,
    load_tombstone_key,
)
from gateway.store.base import Unreadable


class KeySealer:
    """The store's `Sealer`: AES-256-GCM under the key store's data keys (gateway/privacy/crypto.py)."""

    def __init__(self, keys: KeyStore, pseudonyms: PseudonymKey):
        self.keys = keys
        self._pseudonyms = pseudonyms

    def __repr__(self) -> str:
        return f"KeySealer({self.keys!r})"

    def seal_values(self, device: str, ownership: str, family: str, start_us: int, data: bytes) -> bytes:
        return self.keys.data_key(device, ownership).seal(data, family=family, start_us=start_us)

    def open_values(self, device: str, ownership: str, family: str, start_us: int, data: bytes) -> bytes:
        try:
            return self.keys.data_key(device, ownership, create=False).open(
                data, family=family, start_us=start_us
            )
        except (CryptoError, KeyStoreError) as e:
            raise Unreadable(f"{type(e).__name__}: {e}") from None

    def seal_state(self, device: str, ownership: str, data: bytes) -> bytes:
        return self.keys.data_key(device, ownership).seal_state(data)

    def open_state(self, device: str, ownership: str, data: bytes) -> bytes:
        try:
            return self.keys.data_key(device, ownership, create=False).open_state(data)
        except (CryptoError, KeyStoreError) as e:
            raise Unreadable(f"{type(e).__name__}: {e}") from None

    def pseudonym(self, device: str) -> str:
        return device_pseudonym(self._pseudonyms, device)


def open_sealer(state_dir: Path) -> KeySealer:
    """The sealer of a gateway whose state dir is `state_dir`: its key store (opened; close with
    `sealer.keys.close()`), KEK ($BANDGATE_KEK or the state dir's development key file) and tombstone
    pseudonym key, made on first use."""
    state_dir = Path(state_dir)
    keys = KeyStore(state_dir / KEYS_DB, load_kek(state_dir))
    keys.open()
    return KeySealer(keys, load_tombstone_key(state_dir / TOMBSTONE_FILE))
