"""The built-in demo: models that work with no download."""
