"""Recipes: the pydantic model, YAML loading with located errors, sources, mergekit translation."""
