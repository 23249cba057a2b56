"""Model-backed annotators: Florence-2 tagger, VLM verifier/rewriter, oracle, response cache."""
