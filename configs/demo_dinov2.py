"""Demo with the DINOv2 pieces: the demo's run with DINOv2's ViT and its loss terms.

Command:   python train.py --config=demo_dinov2
Hardware:  any CPU, as configs/demo.py.
Expected:  no published figure: a smoke run of the options together on the bundled
           Fashion-MNIST subset (k-NN top-1 printed at the end, beside its baselines).

Everything is configs/demo.py but:
  model.arch = "dinov2"              DINOv2's ViT (dinov2/models/vision_transformer.py) at the
                                     demo's sizes (width 96, 4 blocks, 3 heads, 7 x 7 patches)
  model.num_register_tokens = 4      registers (Darcet et al. 2024), as the *_reg models
  model.layerscale_init = 1e-5       LayerScale (Touvron et al. 2021), DINOv2's training value
  model.ffn = "swiglufused"          SwiGLU feed-forward (Shazeer 2020), as ViT-g
  model.interpolate_offset = 0.0     the *_reg models' resize settings (dinov2/hub/backbones.py)
  model.interpolate_antialias = True
  dino.centering = "sinkhorn"        Sinkhorn-Knopp teacher targets (DINOv2's sinkhorn_knopp)
  dino.koleo_weight = 0.1            KoLeo (DINOv2's koleo_loss_weight)
  dino.ibot_weight = 1.0             iBOT's masked-patch loss (DINOv2's ibot.loss_weight), block
                                     masks on half the global crops, 10-50% of their patches
                                     (ibot.mask_sample_probability, ibot.mask_ratio_min_max)
  dino.ibot_separate_head = True     a patch head of its own, as DINOv2's ViT-L/14 and ViT-g/14
                                     recipes (dinov2/configs/train/vitl14.yaml)
  eval.attention_images = 0          attention maps are DINO's ViT's
"""

import pathlib
import runpy


def get_config():
    demo = runpy.run_path(str(pathlib.Path(__file__).with_name("demo.py")))
    c = demo["get_config"]()
    c.model.arch = "dinov2"
    c.model.num_register_tokens = 4
    c.model.layerscale_init = 1e-5
    c.model.ffn = "swiglufused"
    c.model.interpolate_offset = 0.0
    c.model.interpolate_antialias = True
    c.dino.centering = "sinkhorn"
    c.dino.koleo_weight = 0.1
    c.dino.ibot_weight = 1.0
    c.dino.ibot_separate_head = True
    c.eval.attention_images = 0
    return c
