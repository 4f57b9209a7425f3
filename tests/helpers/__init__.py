"""What the tests share: tiny models and loaders (`models`), the Hydra app in a temporary run
directory (`app`), and a plain PyTorch training loop (`loop`)."""
