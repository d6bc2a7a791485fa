"""What the device and the source share on the wire: the protocol (generated code), tensor
serialisation, authentication, TLS, keepalive, gRPC server settings, metrics and process lifecycle."""
