"""Helpers for the test suite: real servers, certificates and tiny Celery apps."""
