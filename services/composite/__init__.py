"""The `composite` stage service (see docs/DESIGN.md)."""
