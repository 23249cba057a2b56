"""The 3D-detection corpus: Omni3D and EmbodiedScan boxes converted to camera-frame text records."""
