"""The point-map corpus: RGB-D frames back-projected to sampled, coloured 3D points."""
