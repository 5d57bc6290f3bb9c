"""Data: reading the official RSNA layouts, packing WebDataset shards, synthetic phantoms, loaders."""
