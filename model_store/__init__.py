"""Building what TorchServe loads: tiny offline checkpoints and model archives."""
