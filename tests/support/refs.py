"""References as outside callers may send them."""


def unhashed(ref):
    """The reference an outside caller may send: key without sha256 (the stage must look the content up)."""
    copy = type(ref)()
    copy.CopyFrom(ref)
    (copy.object if hasattr(copy, "object") else copy).sha256 = ""
    return copy
