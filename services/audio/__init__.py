"""The `audio` stage service (see docs/DESIGN.md)."""
