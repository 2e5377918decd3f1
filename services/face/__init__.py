"""The `face` stage service (see docs/DESIGN.md)."""
