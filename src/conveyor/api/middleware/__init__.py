"""ASGI middleware, one per file, outermost first: request id, access log, body limit, auth,
405s for methods the OpenAPI document does not list."""
