"""Evaluation metrics on samples: `metrics.fid` (FID, KID, precision/recall and Inception
Score on the FID Inception-v3's features, matching pytorch-fid).

A metric consumes samples (and reference statistics) and returns plain numbers for the
run's metrics file; features and statistics are NumPy arrays (float64 where pytorch-fid
uses float64), so they can be cached and compared with other evaluators.
"""
