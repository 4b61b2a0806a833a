"""The only readers and writers of pipeline artifacts (they enforce :mod:`schemas.artifacts`)."""
