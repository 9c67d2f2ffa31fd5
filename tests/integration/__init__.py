"""Integration tests: real celery workers against real Redis and RabbitMQ."""
