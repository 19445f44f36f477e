"""The core: what every family shares and nothing family-specific (see docs/contributing.md)."""
