"""Chaos suite: real worker nodes, real signals, random kills; run by ``tox -e chaos``."""
