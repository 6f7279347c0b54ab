"""Layer-wise LoRA experts (MoLA): the plugin and its routers."""
