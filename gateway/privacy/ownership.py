"""Ownership: whose a device's data is now. One starts when a device is registered and at a transfer (a
resold band), so a new owner never sees or inherits the last one's data, consent or profile: data keys,
consent decisions and the profile all belong to one ownership."""

from __future__ import annotations

import secrets

from gateway.store.base import RegistryOp, RegistrySnapshot


def new_ownership() -> str:
    """An ownership ID: random, so it links nothing across owners."""
    return "o-" + secrets.token_hex(8)


def current_ownership(snapshot: RegistrySnapshot | None, device: str) -> str | None:
    if snapshot is not None:
        for o in snapshot.ownerships:
            if o.device == device:
                return o.ownership
    return None


def ownership_ops(snapshot: RegistrySnapshot | None, device: str) -> tuple[str, list[RegistryOp]]:
    """The device's current ownership, and the op that starts one if it has none yet (a device registered
    before ownerships existed, or on an insecure development gateway)."""
    ownership = current_ownership(snapshot, device)
    if ownership is not None:
        return ownership, []
    ownership = new_ownership()
    return ownership, [RegistryOp("ownership", device=device, ownership=ownership)]


def transfer_op(device: str) -> tuple[str, RegistryOp]:
    """A new ownership for `device`: the previous one ends (its data stays, unreachable to the new owner,
    until it is erased)."""
    ownership = new_ownership()
    return ownership, RegistryOp("ownership", device=device, ownership=ownership)
