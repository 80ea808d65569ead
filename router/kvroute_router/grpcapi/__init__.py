"""kvroute's native gRPC API (``kvroute.v1.Router``: Pick and Report) and a typed client."""
