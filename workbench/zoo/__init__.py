"""The model zoo: small language models trained here, from scratch, to test merging methods on.

Merging methods are judged by what the merged model can do, and that needs real models with real,
measurable skills. Nothing can be downloaded on the machines the workbench is developed and tested
on, so ``workbench zoo build DIR [--scale tiny|small] [--seed N]`` trains a family of models on
synthetic data, on CPU, deterministically (the same command gives the same weights, bit for bit).

Two synthetic languages
-----------------------
*Language A* has 72 words: the digits 0-9, nouns (animals and people, food, things, places),
determiners, adjectives, prepositions, verbs and a few function words (``what is ... plus ... ?``).
Its sentences come from a small grammar in which each verb selects the nouns it can take as object
(``eats`` takes food, ``reads`` takes ``book``), so there is structure for a language model to learn:
``the tired dog chases a red ball near my garden .``

*Language B* is a fixed bijective re-mapping of A's words onto a separate range of token ids, with
pseudo-word spellings (``the`` is ``dova``). It has A's grammar and word order, so every A sentence
has exactly one B translation, word for word, digits included. Task tags (``<math>``, ``<object>``)
and the answer marker ``=`` are shared, like markup around real text.

Tasks
-----
Every task yields ``(prompt, answer)`` token ids: ``<bos> <tag> ... =`` then the answer and
``<eos>``. Examples are split into train / validation / test by a hash of their content (their
A form), so held-out examples never occur in training, and a problem posed in B has the same
split as its A original.

=============  ==========================================================  =================
task           example (prompt => answer)                                  metric
=============  ==========================================================  =================
subject        ``<subject> my sad cat eats the cake . =`` => ``cat``        exact match
object         ``<object> my sad cat eats the cake . =`` => ``cake``        exact match
count          ``<count> box ? box dog red box =`` => ``2``                 exact match
sort           ``<sort> 4 3 1 9 =`` => ``1 3 4 9``                          exact match
reverse        ``<reverse> book fish dog =`` => ``dog fish book``           exact match
math           ``<math> what is 7 plus 8 ? =`` => ``1 5`` (also minus and   exact match
               word problems: ``the dog has 2 cake and gets 3 more ...``)
math_b         the same problems, posed and answered in language B          exact match
text_a/text_b  generic text in A / in B                                     next-word accuracy
text_mixed     code-switched text (each word at random in A or B)          next-word accuracy
translate      ``<a2b>`` A sentence ``=`` => its B translation (and         exact match
               ``translate_b2a``)
=============  ==========================================================  =================

Exact match is scored by teacher forcing: the answer counts when every answer token is the
model's argmax, which is what greedy decoding would produce, in one forward pass per batch. Each
task has an evaluator ``zoo_<task>`` (``workbench eval``), returning ``accuracy``,
``token_accuracy`` and ``loss``; it refuses, with a message naming the model, anything but a
``LlamaForCausalLM`` with the zoo's vocabulary.

Contents of a built zoo
-----------------------
Every model is a ``LlamaForCausalLM`` saved as a Hugging Face folder (``model.safetensors``,
``config.json`` and a word-level ``tokenizer.json`` that prepends ``<bos>``):

* ``base``: pretrained on generic text in A and (less) in B, code-switched text, and translation
  both ways. The parallel data is what lets the middle layers be shared by the two languages.
* ``experts/<task>`` for subject, object, count and sort: the base fully fine-tuned on one task
  (every fourth step replays pretraining data, so experts stay language models and task vectors
  stay moderate). For task arithmetic, TIES, DARE, LiNeS, PCB and the like.
* ``math``: the base fine-tuned on arithmetic posed in A; good at ``math``, poor at ``math_b``.
  ``language``: the base fine-tuned on generic B text; better than the base on ``text_b``. The
  pair reproduces the setting of layer swapping for zero-shot cross-lingual transfer.
* ``ot_a`` and ``ot_b``: trained from two different random initialisations (no shared
  pretraining) on ``reverse``; for optimal-transport fusion, which must align their units.
* ``lora/<task>`` for subject, object and count: LoRA adapters (r = 8, alpha = 16, all seven
  projections) on the frozen base, in PEFT's format; for LoRA merging and mixtures of LoRA experts.
* ``zoo.json``: the scale, seed and command, the tasks, and for every model how it was trained and
  its accuracy and loss on every task, measured at build time on held-out examples.

Scales: ``tiny`` (hidden 64, 4 layers; under a minute on 2 cores, for tests) and ``small``
(hidden 128, 6 layers; about 10 minutes, for the documented tables). The build runs its jobs in
two worker processes; call :func:`workbench.zoo.build.build_zoo` from a script only under
``if __name__ == "__main__":``, as for any use of ``multiprocessing``.
"""
