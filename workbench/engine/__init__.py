"""The streaming merge engine: plan, run (read -> method -> write), shard tasks, manifest, progress."""
