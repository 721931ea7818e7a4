"""Privacy at rest and in policy: consent, erasure, export, and the keys that seal stored features."""
