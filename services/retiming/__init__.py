"""The `retiming` stage service (see docs/DESIGN.md)."""
