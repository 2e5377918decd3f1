"""The `lipsync` stage service (see ../shared/design/PIPELINE.md)."""
