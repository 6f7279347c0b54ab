"""The base of every recipe section: unknown keys are errors, never ignored (a typo in a recipe must
not silently fall back to a default)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
