"""The bandgate service: everything with I/O (gRPC, storage, CLI, simulated bands)."""
