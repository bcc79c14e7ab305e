"""Decay monitoring: is the served model getting worse than the market allows?

* :mod:`~ctrstream.monitoring.decay` - the statistics, River style (``update_many`` /
  ``get``, no I/O): per served model version over rolling windows of event time, online
  NE and AUC on the joined labels next to the oracle's on the same impressions, the
  calibration ratio and ECE, an ADWIN on the excess log loss over the oracle, the decay
  alarm; feature drift per family (population stability index against the training
  distribution); label delay and the share of clicks after the join window.
* :mod:`~ctrstream.monitoring.offline` - challenger against champion on the same rows, on
  the exploration slice weighted by inverse propensity (the offline gate's fair comparison);
* :mod:`~ctrstream.monitoring.job` - ``ctrstream monitor``: Kafka in (predictions, labels,
  the join's late clicks), Prometheus and the store's decay state out.

``docs/monitoring-decay.md`` says what each number means and what was measured.
"""
