"""Kafka: client settings, topics, partition readers, dead letters and watermark heartbeats.

The only code that knows how ctrstream talks to Kafka (producer and consumer settings, the
partitioner that keeps a click with its impression, the signed heartbeat records and their
secret, the dead-letter record). Layer 1: imports the settings and the event codec only.
"""
