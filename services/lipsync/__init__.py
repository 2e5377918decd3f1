"""The `lipsync` stage service (see docs/DESIGN.md)."""
