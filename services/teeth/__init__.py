"""The `teeth` stage service (see docs/DESIGN.md)."""
