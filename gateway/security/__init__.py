"""Identity, registry, grants and audit: who may do what."""
