"""The model kind diffusers reads from a single-file checkpoint (`v1`, `v2`, `xl_base`, `flux-dev`, ...;
see training/families/__init__.py checkpoint_family): its own single-file inference runs on tensors of
the checkpoint's shapes on the meta device, so no weight is read. That needs torch and diffusers, so
`python -m training.families.checkpoint` answers it for the server (training/request_child.py):
{path} in, {kind} out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.request_child import serve_request


def checkpoint_kind(path: Path) -> str | None:
    """diffusers' kind of the .safetensors checkpoint at `path`, None when it is not one (loading it says why)."""
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
    except Exception:  # not a safetensors file
        return None
    from training.families import FAMILIES  # the registry imports this module

    # Kinds diffusers has none for ask their family first: it would call a Qwen-Image transformer SD 1.x ("v1").
    own = (kind for family in FAMILIES.values() if (kind := family.checkpoint_kind(header)) is not None)
    return next(own, None) or infer_diffusers_model_type(header)


def main() -> int:
    return serve_request(lambda path: {"kind": checkpoint_kind(Path(path))}, ())


if __name__ == "__main__":
    sys.exit(main())
