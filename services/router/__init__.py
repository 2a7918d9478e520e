"""The router: OpenAI-compatible HTTP API and gRPC front door; places requests on pods."""
