"""The local stack: real Kafka (KRaft), Redis and Triton on loopback."""
