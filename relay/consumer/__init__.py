"""The consumer daemon beside the relay: RabbitMQ topology per consumer group, and the runner.

`outbox.consumer` (what applications import) decides what a message does; this package gets
messages from RabbitMQ to it in per-key order and acks them after the commit.
"""
