"""One module per variant; each ends with ``VARIANT = Variant(...)`` (see `base`)."""
