"""Packaged training configs (YAML), found by name by `gr3d train --config NAME`."""
