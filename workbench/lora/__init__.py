"""LoRA as a first-class input and output: PEFT adapters read and written (``adapter``), applied
lazily to a base checkpoint (``workbench.checkpoint.adapted``), extracted from a fine-tune by
truncated SVD (``extract``) and combined with task-vector methods on their ΔW (``merge``)."""
