"""Where fine-tuning changed a model and what a merge learned: statistics, heatmaps, summaries."""
