"""What freshness is worth: model quality against the truth as features, models, labels and
predictions age (``ctrstream study freshness``, ``docs/freshness.md``).

The study runs on generated traffic, whose true click probabilities are known, and uses the
batch layer's point-in-time machinery to serve features exactly as a pipeline of a given
staleness would (no replay needed). One module per sweep: :mod:`.staleness` (feature
staleness), :mod:`.model_age` (model age, retraining cadence, continuous training),
:mod:`.label_delay` (the join's attribution window), :mod:`.batch_inference` (precomputed
predictions against online scoring); :mod:`.data` builds what they share.
"""
