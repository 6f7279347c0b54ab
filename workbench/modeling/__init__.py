"""Torch modules built and trained here, shared by methods, evaluators and the zoo: the MoLA runtime,
LoRA rank allocation, low-rank factorisation and the training loop (the ground floor: no engine)."""
