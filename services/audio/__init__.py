"""The `audio` stage service (see ../shared/design/PIPELINE.md)."""
