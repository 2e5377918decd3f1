"""The `composite` stage service (see ../shared/design/PIPELINE.md)."""
