"""ASGI middleware, one per file, outermost first: request id, access log, body limit, auth."""
