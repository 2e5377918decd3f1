"""The `texture` stage service (see docs/DESIGN.md)."""
