import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

# Reference models here are tiny: torch's intra-op threads only add overhead (0.27 s vs 4 ms per tiny forward with
# 2 threads on this 2-core machine while JAX is busy).
torch.set_num_threads(1)

from tests.reference import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def imported(tmp_path_factory):
    """family -> (torch reference model, dlmjax checkpoint dir, raw config); built once per session."""
    from dlmjax.checkpoint import import_hf

    cache = {}

    def get(family: str, tie: bool = False):
        key = (family, tie)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{family}{'_tied' if tie else ''}")
            model, raw, sd = hf_models.build(family, seed=zlib.crc32(repr(key).encode()) % 1000, tie=tie)
            hf_models.write_hf_dir(str(root / "hf"), raw, sd)
            import_hf(str(root / "hf"), str(root / "dlmjax"))
            cache[key] = (model, str(root / "dlmjax"), raw, str(root / "hf"))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def dream(imported):
    """(torch Dream reference, cfg, params) of the random Dream model with its LM head scaled by SHARPEN on both
    sides, so thresholds matter (the Dream decoder tests)."""
    from dlmjax.checkpoint import load_checkpoint
    from tests.dream_common import SHARPEN

    model, ckpt, _, _ = imported("dream")
    cfg, params = load_checkpoint(ckpt)
    return hf_models.scaled_lm_head(model, SHARPEN, None), cfg, {**params, "lm_head": params["lm_head"] * SHARPEN}
