"""Posteriors over a finished run's LoRA weights, fitted without training again.

- :mod:`.kfac` K-FAC curvature of every member's A and B; :mod:`.laplace` Laplace-LoRA's
  Gaussian around each member (evidence, logit covariance, weight draws); :mod:`.tfb`
  training-free Bayesianisation (rotation, σ search);
- :mod:`.passes` and :mod:`.predictive` the stacked passes with gradients and the predictive
  distributions (linearised or sampled: S draws of M members as M·S rows of one pass);
- :mod:`.fit` ``loraens posterior`` on a run directory; :mod:`.state` its files;
  :mod:`.load` loading any run, posterior or not, for the scoring commands.
"""
