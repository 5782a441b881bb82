"""Generated gRPC/protobuf code for the datacache.v1 API (scripts/gen-protos). Do not edit."""
