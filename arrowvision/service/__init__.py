"""The HTTP service: app wiring, batching, routes, profiles, security and tracing."""
