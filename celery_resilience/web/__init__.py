"""``celery -A proj resilience web``: a small page over the dead-letter queue.

Standard library only (``http.server``, ``html.escape``, ``hmac``): no framework, no
template engine, no JavaScript, no asset from elsewhere. ``security`` decides who may
read and who may change what, ``layout`` and ``pages`` write the HTML, ``actions``
change the DLQ, ``server`` routes requests to them.
"""
