"""The grounded chain-of-thought corpus: RefSpatial QA, tagged, verified, rewritten and composed."""
