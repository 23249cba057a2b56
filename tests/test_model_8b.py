"""The gr3d-8b preset on the meta device: NVILA-Lite-8B's parameter count plus the GR3D modules.

Reference: the safetensors sizes of Efficient-Large-Model/NVILA-Lite-8B on the Hugging Face hub (bf16, 2 bytes
per parameter): llm/ 4.87 + 4.93 + 4.33 + 1.09 GB, vision_tower/ 827 MB, mm_projector/ 122 MB, i.e.
~7.61 B + 0.4135 B + 0.061 B = 8.0845 B parameters (sizes are rounded to 3 digits, so +-0.5%).
"""

import pytest
import torch

from model.checkpoint import build_gr3d_8b

GB = 1e9
REFERENCE = {"llm": (4.87 + 4.93 + 4.33 + 1.09) * GB / 2, "vision": 0.827 * GB / 2, "projector": 0.122 * GB / 2}
NVILA_LITE_8B = sum(REFERENCE.values())  # 8.0845e9


@pytest.fixture(scope="module")
def counts():
    model = build_gr3d_8b(device="meta")
    assert next(model.parameters()).device == torch.device("meta")
    assert model.config.num_image_tokens == 121 and model.config.grid == 32
    return model.parameter_counts()


def test_8b_parameter_count_matches_nvila_lite_plus_gr3d_modules(counts):
    for part, ref in REFERENCE.items():
        assert abs(counts[part] - ref) / ref < 0.01, (part, counts[part], ref)
    expected = NVILA_LITE_8B + counts["gr3d_modules"]
    assert abs(counts["total"] - expected) / expected < 0.02
    # the GR3D additions are small: spatial PE + region encoder well under 1% of the model
    assert 0 < counts["gr3d_modules"] < 0.01 * counts["total"]
    print("gr3d-8b parameters:", counts)
