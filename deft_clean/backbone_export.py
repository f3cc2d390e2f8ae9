"""Exporting a backbone as a self-contained folder, for machines that cannot download or install its weights.

The folder is open_clip's ``local-dir:`` form (``open_clip_config.json`` + ``open_clip_model.safetensors``),
so ``--pretrained local-dir:DIR`` (``backbone.load_backbone``) and open_clip itself both load it. Writing
it lives here, apart from the registry in ``backbone``, because it is the one place a backbone is saved:
it needs the output checks and the atomic folder writer, which loading never does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from deft_clean.backbone import CONFIG_FILE, WEIGHTS_FILE, build_backbone, plan_backbone
from deft_clean.config import BackboneConfig, resolve_backbone
from deft_clean.files import atomic_folder, check_output, releases_outputs, write_description

EXPORT_FORMAT, EXPORT_VERSION = "deft-clean-backbone", 1


@releases_outputs
def export_backbone(
    config: BackboneConfig, out_dir: Path, *, half: bool = False, overwrite: bool = False
) -> Path:
    """Write the backbone as an open_clip ``local-dir:`` folder, loadable with ``--pretrained local-dir:DIR``.

    ``out_dir`` gets ``open_clip_config.json`` (model and preprocess config, plus what deft-clean needs to
    restore the Backbone fields, under the shared saved-folder header of ``files.write_description``) and
    ``open_clip_model.safetensors`` (fp16 when ``half``). An HF text tower's config and tokenizer files
    are saved into ``out_dir`` too and referred to by the relative path ".", so the folder is
    self-contained (the target machine needs transformers, not the offline PyPI packages). The folder
    is written atomically (checked first: a non-empty folder is refused unless ``overwrite``). Returns
    ``out_dir``.
    """
    check_output(out_dir, overwrite=overwrite, kind="folder")
    config = resolve_backbone(config)
    plan = plan_backbone(config)
    backbone = build_backbone(plan, config.pretrained)
    model_cfg = copy.deepcopy(plan.model_cfg)
    dtype = torch.float16 if half else torch.float32
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in backbone.model.state_dict().items()
    }
    with atomic_folder(out_dir) as folder:
        if plan.text_dir is not None:
            model_cfg["text_cfg"].update(hf_model_name=".", hf_tokenizer_name=".", hf_model_pretrained=False)
            backbone.model.text.config.save_pretrained(folder)
            backbone.tokenizer.save_pretrained(folder)
        body = {
            "model_cfg": model_cfg,
            "preprocess_cfg": open_clip.get_model_preprocess_cfg(backbone.model),
            "deft_clean": {"model": plan.name, "aligned": plan.aligned, "notes": list(plan.notes)},
        }
        write_description(folder, CONFIG_FILE, EXPORT_FORMAT, EXPORT_VERSION, body)
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(out_dir)
