"""The `face` stage service (see ../shared/design/PIPELINE.md)."""
