"""LoRA tools built on the engine: extracted from a fine-tune by truncated SVD (``extract``), combined
with task-vector methods on their ΔW (``merge``), and MoLA experts trained with their routers
(``mola_train``). PEFT adapters are read and written by ``workbench.checkpoint.lora_adapter`` and applied
lazily by ``workbench.checkpoint.adapted``; the MoLA runtime is ``workbench.modeling.mola``."""
