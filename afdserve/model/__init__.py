"""Model code in plain PyTorch: layers, architectures, loading. Knows nothing of AFD roles."""
