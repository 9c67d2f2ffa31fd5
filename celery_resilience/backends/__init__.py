"""Built-in backends. Each module is a pluggy plugin providing backend factories."""
