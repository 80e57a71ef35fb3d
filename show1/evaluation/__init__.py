"""Evaluation: video metrics (FID-vid, FVD, CLIPSIM, Inception Score, temporal consistency) over local models."""
