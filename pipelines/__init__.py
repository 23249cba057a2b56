"""Corpus builders: the engine (stages, plan, executors), the sources, the three corpora, the sample world,
the audit, the root CLI and the demo."""
