"""The three corpora. Each package holds its config, its listing, its stages and `make_builder`:
`det3d` (3D detection as text), `pointmaps` (RGB-D back-projected points), `cot` (grounded chain of thought).
"""
