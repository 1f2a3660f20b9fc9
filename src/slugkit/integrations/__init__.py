"""Carry a SLUG edit of a transformers ``CLIPModel`` into the models built on one of its towers.

* :mod:`slugkit.integrations.diffusers_sd`: Stable Diffusion 1.x / 2.x, whose ``text_encoder`` is CLIP's text tower
  (SD 2.x keeps only the first 23 of ViT-H/14's 24 text layers), and SDXL, whose ``text_encoder`` (read at
  ``hidden_states[-2]``) and ``text_encoder_2`` (also its projected pooled output) are two CLIPs' text towers;
* :mod:`slugkit.integrations.llava`: LLaVA-1.5, whose ``vision_tower`` is CLIP's vision tower read at
  ``config.vision_feature_layer`` (−2: the last encoder layer, ``post_layernorm`` and ``visual_projection`` are
  never read).

The official notebooks copy *every* parameter of the edited CLIP into the pipeline (SD) or swap the whole tower
(LLaVA). Here a patch made on the ``CLIPModel`` (names such as ``text_model.encoder.layers.3.mlp.fc1.weight``) is
applied **in place** to the consumer's own tensors through a renamed view, with the hash checks and bit-exact revert
of :mod:`slugkit.patch`. Names are mapped by module, not by string tables: the CLIP tower inside the consumer is found
by structure (the shallowest module with ``embeddings``, ``encoder`` and ``final_layer_norm`` — text — or
``pre_layrnorm``/``post_layernorm`` — vision), so the same code handles transformers 5's layout
(``CLIPTextModel`` params ``encoder.layers.3...``; LLaVA's ``model.vision_tower.encoder.layers.3...``) and the 4.x one
(``text_model.encoder...``; ``vision_tower.vision_model.encoder...``).

**Half precision.** SD pipelines usually run an fp16 ``text_encoder``. When a consumer tensor's dtype differs from
the patch's, the patch is cast to it first (:func:`slugkit.patch.cast_patch`, the same cast every fp16 / bf16 target
gets: original and patched values, ``Tensor.to``), and the hash check compares against the *cast* original: it
passes when the consumer holds the CLIP weights rounded to its dtype, which is how fp16 variants are made. Revert
then restores exactly the bytes the consumer held. An edit that rounds away entirely in the lower precision is
refused.

**Architecture.** A patch that records the CLIP model's architecture facts (``hidden_act`` per tower,
``layer_norm_eps``; :func:`slugkit.patch.architecture_facts`) is refused by a consumer whose config says otherwise.

**Weights on disk.** Folders are checked before a library loads them (:func:`check_weight_files`): a Git LFS pointer
in place of a ``*.safetensors`` file is named as one ("run ``git lfs pull``"), not a loader's traceback.
"""

from .consumer import consumer_restriction, restrict_to_consumer
from .towers import (CLIP_TOWER_PREFIX, TowerMismatchError, apply_to_consumer, cast_patch, check_weight_files,
                     consumer_view, find_tower, layer_names, num_layers, tower_map, verify_tower, write_provenance)

__all__ = ["CLIP_TOWER_PREFIX", "TowerMismatchError", "apply_to_consumer", "cast_patch", "check_weight_files",
           "consumer_restriction", "consumer_view", "find_tower", "layer_names", "num_layers", "restrict_to_consumer",
           "tower_map", "verify_tower", "write_provenance"]
