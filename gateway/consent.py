"""Which feature families a device's owner has agreed to: the pipeline keeps only those records."""

from __future__ import annotations

import abc


class ConsentGate(abc.ABC):
    """Consent per device and family (the privacy package will back this with stored consent)."""

    @abc.abstractmethod
    def allowed(self, device_id: int, families: frozenset[str]) -> frozenset[str]:
        """The subset of `families` that may be stored for `device_id`; empty stops processing entirely."""


class AllowAll(ConsentGate):
    """Every family for every device: for development and for deployments that collect consent upstream."""

    def allowed(self, device_id: int, families: frozenset[str]) -> frozenset[str]:
        return families
