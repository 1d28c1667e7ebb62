"""WaRA runtime: the KServe-v2 gRPC server for one base model and many adapters (issue 4).

Importing this package must stay cheap: no training code, no CUDA initialisation.
"""
