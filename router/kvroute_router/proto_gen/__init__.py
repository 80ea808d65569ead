"""Generated protobuf code for router/proto (regenerate with tests/grpc/test_proto_drift.py's command; do not edit)."""
