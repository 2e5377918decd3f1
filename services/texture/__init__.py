"""The `texture` stage service (see ../shared/design/PIPELINE.md)."""
