"""The HTTP service: the ASGI app, its middleware, the read and write endpoints and the read model."""
