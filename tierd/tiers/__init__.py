"""Storage tiers behind one small interface (see :mod:`tierd.tiers.base`)."""
