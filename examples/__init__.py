"""Runnable examples of bandgate's consumer side (not part of the installed package)."""
