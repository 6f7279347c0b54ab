"""Hyperparameter sweeps: candidate recipes merged and scored, and where candidates run."""
