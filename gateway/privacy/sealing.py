"""Encryption at rest for the stores: the `Sealer` a store is given (gateway/store/base.py), backed by the
key store's per device × ownership data keys and the pseudonym key of erasure tombstones.

A value that does not open becomes `Unreadable` for the store, which skips it and reports it by
identifiers: its key was destroyed (an erased device: nothing of it can be read from then on), or the
ciphertext was moved from another device's, family's or time's row (tampering).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gateway.privacy.crypto import CryptoError, DataKey, PseudonymKey, device_pseudonym
from gateway.privacy.keys import (
    DEFAULT_KEY_SCHEMA,
    KEYS_DB,
    TOMBSTONE_FILE,
    DataKeyStore,
    KeyStoreError,
    KeyStoreUnavailable,
    is_postgres_url,
    key_store_for_url,
    load_kek,
    load_tombstone_key,
)
from gateway.store.base import StoreUnavailable, Unreadable

REUSE_S = 0.1  # how long a looked-up data key serves before the key store is asked again


class KeySealer:
    """The store's `Sealer`: AES-256-GCM under the key store's data keys (gateway/privacy/crypto.py)."""

    def __init__(self, keys: DataKeyStore, pseudonyms: PseudonymKey, reuse_s: float = REUSE_S):
        self.keys = keys
        self._pseudonyms = pseudonyms
        self._reuse_s = reuse_s
        self._held: dict[tuple[str, str, bool], tuple[float, DataKey]] = {}

    def _key(self, device: str, ownership: str, create: bool) -> DataKey:
        """The data key, held for `reuse_s`: a page of records or a batch asks the key store once, not per
        value (its lookup costs several times an AES-GCM open). A destroy in this process reaches a held
        key at once (`DataKey.forget`); one in another process, within `reuse_s`."""
        now = time.monotonic()
        slot = (device, ownership, create)
        held = self._held.get(slot)
        if held is not None and now - held[0] < self._reuse_s and not held[1].destroyed:
            return held[1]
        key = self.keys.data_key(device, ownership, create=create)
        if len(self._held) > 4096:
            self._held.clear()
        self._held[slot] = (now, key)
        return key

    def __repr__(self) -> str:
        return f"KeySealer({self.keys!r})"

    def seal_values(self, device: str, ownership: str, family: str, start_us: int, data: bytes) -> bytes:
        try:
            key = self._key(device, ownership, True)
        except KeyStoreUnavailable as e:  # transient: the batch is refused unacked, and sent again
            raise StoreUnavailable(str(e)) from None
        return key.seal(data, family=family, start_us=start_us)

    def open_values(self, device: str, ownership: str, family: str, start_us: int, data: bytes) -> bytes:
        try:
            return self._key(device, ownership, False).open(data, family=family, start_us=start_us)
        except KeyStoreUnavailable as e:  # the key store's database is away: the row is not unreadable
            raise StoreUnavailable(str(e)) from None
        except (CryptoError, KeyStoreError) as e:
            raise Unreadable(f"{type(e).__name__}: {e}") from None

    def values_opener(self, device: str, ownership: str) -> Callable[[str, int, bytes], bytes]:
        try:
            key = self._key(device, ownership, False)
        except KeyStoreError as e:
            reason = f"{type(e).__name__}: {e}"

            def refuse(family: str, start_us: int, data: bytes) -> bytes:
                raise Unreadable(reason)

            return refuse

        open_record = key.records_opener()

        def open_one(family: str, start_us: int, data: bytes) -> bytes:
            try:
                return open_record(family, start_us, data)
            except CryptoError as e:
                raise Unreadable(f"{type(e).__name__}: {e}") from None

        return open_one

    def seal_state(self, device: str, ownership: str, data: bytes) -> bytes:
        try:
            key = self._key(device, ownership, True)
        except KeyStoreUnavailable as e:
            raise StoreUnavailable(str(e)) from None
        return key.seal_state(data)

    def open_state(self, device: str, ownership: str, data: bytes) -> bytes:
        try:
            return self._key(device, ownership, False).open_state(data)
        except KeyStoreUnavailable as e:
            raise StoreUnavailable(str(e)) from None
        except (CryptoError, KeyStoreError) as e:
            raise Unreadable(f"{type(e).__name__}: {e}") from None

    def pseudonym(self, device: str) -> str:
        return device_pseudonym(self._pseudonyms, device)


def open_sealer(state_dir: Path, store_url: str = "", *, key_schema: str = DEFAULT_KEY_SCHEMA) -> KeySealer:
    """The sealer of a gateway whose state dir is `state_dir` and store `store_url`: its key store
    (`keys.key_store_for_url`: schema `key_schema` of a PostgreSQL store's database, else the state dir's
    keys.db; opened, close with `sealer.keys.close()`), KEK ($BANDGATE_KEK or the state dir's development
    key file) and tombstone pseudonym key, made on first use."""
    state_dir = Path(state_dir)
    keys = key_store_for_url(store_url, state_dir, load_kek(state_dir), schema=key_schema)
    keys.open()
    return KeySealer(keys, load_tombstone_key(state_dir / TOMBSTONE_FILE))


def has_key_store(state_dir: Path, store_url: str = "") -> bool:
    """Whether a gateway with this state dir and store has made its key store (so its rows are sealed):
    a PostgreSQL store's is in its database, made at the gateway's first start; else keys.db."""
    return is_postgres_url(store_url) or (Path(state_dir) / KEYS_DB).exists()
