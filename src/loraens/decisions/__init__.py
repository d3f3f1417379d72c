"""Decisions from calibrated probabilities: temperature scaling, selective prediction (answer or
abstain) and conformal answer sets, fitted on questions held out from training.

Modules: :mod:`.temperature`, :mod:`.selective`, :mod:`.conformal` (numpy only, on any
(log-probs, labels)); :mod:`.tables` (the single / ensemble / + TS models side by side);
:mod:`.run` (a run directory's calibration, used by ``evaluate``, ``predict``, ``ood`` and
``calibrate``); :mod:`.ood` (an experiment's ``ood_eval`` of a run of any method, kept question
by question). This package sits above :mod:`loraens.evaluation` and below
:mod:`loraens.training`, :mod:`loraens.experiments` and the CLI.
"""
