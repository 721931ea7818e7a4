"""Simulated bands: signal models with ground truth, and clients that send what they record."""

from gateway.simulator.signals import BandRecording, simulate_band

__all__ = ["BandRecording", "simulate_band"]
