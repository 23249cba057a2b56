"""Corpus builders: sources, stages, executors (Ray, Beam), geometry, the sample world, the audit."""
