"""Dense fine-tunes of one base composed into a sparse mixture-of-experts model (mergekit-moe).

``workbench moe CONFIG --out DIR`` (:mod:`workbench.cli.moe`) reads a mergekit-moe 0.1.5 config
unchanged. One idea per module:

- :mod:`~workbench.moe.config`: the YAML, validated, with the line of every problem;
- :mod:`~workbench.moe.architectures`: which output (Mixtral, Qwen2-MoE, Qwen3-MoE) a config gets, its
  tensor names and its config.json;
- :mod:`~workbench.moe.layout`: the output tensors and the input tensors each is made of, from headers;
- :mod:`~workbench.moe.routers`: router weights from prompts (hidden states, embeddings) or random;
- :mod:`~workbench.moe.card`: the model card;
- :mod:`~workbench.moe.build`: opening, checking, routing and streaming into the output folder.

Nothing here is imported by the package itself: torch and transformers load only when a build runs.
"""
