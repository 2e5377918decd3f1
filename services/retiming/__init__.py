"""The `retiming` stage service (see ../shared/design/PIPELINE.md)."""
