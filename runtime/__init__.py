"""WaRA runtime: a serving core for many base models and many WaRA adapters each, behind the
KServe v2 gRPC front door (`runtime.server`), in one process (`runtime.service.Service`) or on
Ray Serve replicas (`runtime.ray_serve`). `runtime.core` is the contract between them.

Importing this package must stay cheap: no training code, no CUDA initialisation.
"""
