"""The paper's alternatives to the LoRA ensemble, each compared against it in §5.1.

- :mod:`loraens.baselines.few_shot`: the base model with k demonstrations, no fine-tuning
  (``loraens few_shot``, experiment cells of kind ``few_shot``).
- :mod:`loraens.baselines.last_layer`: ``ensemble.method=last_layer``, M fine-tuned copies of
  the answer letters' LM-head rows (Table 1).
- ``ensemble.method=mc_dropout`` needs no module of its own: it is LoRA training of a single
  adapter scored with dropout kept on. How many adapters it trains and how many passes it
  averages are :class:`loraens.config.EnsembleConfig`'s ``trained_adapters`` and
  ``passes_per_adapter``; the passes themselves are ``mc_dropout_passes`` of
  :func:`loraens.evaluation.inference.score_members`.

Every ``ensemble.method`` value and its meaning: :data:`loraens.config.ENSEMBLE_METHODS`.
"""
