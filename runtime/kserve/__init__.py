"""Generated KServe v2 gRPC stubs (proto/runtime/kserve/inference.proto); do not edit."""
