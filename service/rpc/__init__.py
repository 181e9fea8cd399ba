"""The gRPC door: servicers, proto <-> dataclasses, TLS. Only this package and the CLI touch protobuf."""
