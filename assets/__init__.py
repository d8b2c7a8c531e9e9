"""Files the product ships: default config, model catalog, styles."""
