"""Executors: where the chunks of a plan run (in-process `local`, `ray_executor`, `beam_executor`).

Each module exposes `execute(...)`; `pipelines.engine.run.run_build` picks one by name and imports it only
when used, so Ray and Beam stay out of processes that do not run them.
"""
