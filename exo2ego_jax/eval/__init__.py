"""EgoBench evaluation: metrics, model scoring and the results report.

The items come from the EgoBench reader, :mod:`input_pipeline.egobench` (official annotation
formats -> :class:`~input_pipeline.egobench.EvalItem` lists).

* :mod:`exo2ego_jax.eval.metrics` — accuracy, Charades mAP, EPIC MIR mAP / nDCG, ROUGE-L
  (pure numpy);
* :mod:`exo2ego_jax.eval.scoring` — multiple choice by length-normalised log-likelihood
  with KV-cache prefix reuse, letter generation, class / retrieval scores, open answers;
* :mod:`exo2ego_jax.eval.report` — resumable JSON-lines predictions and the results table.

See ``docs/egobench.md``.
"""
