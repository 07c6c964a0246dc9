"""tokenwire's HTTP gateway: OpenAI-style REST + Server-Sent Events, transcoded to the service's gRPC API."""
