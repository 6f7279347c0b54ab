"""Running evaluator plugins on a model folder or on a merge's output."""
