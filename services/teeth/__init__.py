"""The `teeth` stage service (see ../shared/design/PIPELINE.md)."""
