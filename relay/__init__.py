"""The outbox relay: forwards committed outbox events to RabbitMQ."""
