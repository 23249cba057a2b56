"""The build engine, shared by every corpus: the `Stage` contract, the plan (inputs -> chunks), the chunk
runner, the executors (local, Ray, Beam) and `run_build`, which ties them together and finalizes a build.

Nothing here knows a corpus; corpora live in `pipelines.corpora`.
"""
