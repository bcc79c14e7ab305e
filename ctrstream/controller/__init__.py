"""The controller: the offline loop on a schedule (layer 5, next to ``ctrstream.loop``, which
it never imports).

Every N hours of event time, and early when the decay monitor raises its alarm, one
**cycle**: the archive caught up to the cut-off, the batch view built and switched,
reconciliation, a point-in-time training set over a sliding window, a challenger trained,
the offline gate (challenger vs champion on the same validation rows, both against the
oracle), then the challenger as a **shadow** arm, then as an **experiment** arm at a traffic
share, and the verdict of the always-valid test and the guardrails: **promote** (the
zero-failure version switch, the calibrator follows) or **roll back**.

* :mod:`.audit` - the append-only JSON-lines audit log;
* :mod:`.checkpoint` - the controller's state (what each step of the cycle decided), atomic;
* :mod:`.gate` - the offline gate, pure numbers;
* :mod:`.decay` - the decay monitor's alarm as the store holds it;
* :mod:`.operations` - every side effect (batch layer, training, Triton, experiments), each
  idempotent or checkable;
* :mod:`.cycle` - the state machine (:class:`~ctrstream.controller.cycle.Controller`);
* :mod:`.metrics` - its Prometheus counters and gauges.

How it is crash safe and how the gate avoids favouring the champion: ``docs/controller.md``.
"""
