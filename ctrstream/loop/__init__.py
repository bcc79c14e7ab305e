"""The closed loop: the world's ad requests through the ad server under an experiment, the
events into Kafka, the ledger and the decision log, per-arm metrics and checkpoints
(ARCHITECTURE.md, "The closed loop")."""
