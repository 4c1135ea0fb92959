"""Network-and-load simulator: predicts GPU cost, bytes and latency of shared sampling at scale."""
