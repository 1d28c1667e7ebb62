"""WaRA core and training."""
