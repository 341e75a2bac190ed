"""Demo with the DINOv3 pieces: the demo's run with DINOv3's RoPE ViT and its loss terms
(Siméoni et al. 2025).

Command:   python train.py --config=demo_dinov3
Hardware:  any CPU, as configs/demo.py.
Expected:  no published figure: a smoke run of DINOv3's backbone on the bundled Fashion-MNIST
           subset (k-NN top-1 printed at the end, beside its baselines).

Everything is configs/demo.py but (dinov3/configs/train/*.yaml names in brackets):
  model.arch = "dinov3"              DINOv3's ViT (dinov3/models/vision_transformer.py) at the
                                     demo's sizes (width 96, 4 blocks, 3 heads, 7 x 7 patches):
                                     no learned position embedding, RoPE in every block
  model.num_register_tokens = 4      storage tokens [student.n_storage_tokens: 4], as the
                                     ViT-L distilled and ViT-7B recipes
  model.layerscale_init = 1e-5       LayerScale [student.layerscale: 1.0e-05], every recipe's
  model.ffn = "swiglu"               SwiGLU feed-forward [student.ffn_layer], as ViT-7B's
                                     swiglu64 (at width 96 both give a hidden width of 256)
  model.rope_dtype = "fp32"          RoPE arithmetic [student.pos_embed_rope_dtype: fp32], as
                                     ViT-7B's and the released hub models'
  model.rope_rescale_coords = 2.0    RoPE coordinate rescaling in [1/2, 2] while training
                                     [student.pos_embed_rope_rescale_coords: 2], as the ViT-L
                                     distilled and ViT-7B recipes
  dino.centering = "sinkhorn"        Sinkhorn-Knopp teacher targets [train.centering]
  dino.koleo_weight = 0.1            KoLeo [dino.koleo_loss_weight: 0.1]
  dino.ibot_weight = 1.0             iBOT's masked-patch loss [ibot.loss_weight: 1.0], DINOv2's
                                     masking (ratios 0.1-0.5 on half the global crops)
  dino.ibot_separate_head = True     [ibot.separate_head: true]
  dino.gram_weight = 1.0             Gram anchoring [gram.loss_weight], batch-level Grams of
                                     all patches [gram.img_level: false, gram.tokens_used: all]
  dino.gram_start_step = 780         the frozen Gram teacher taken from the EMA teacher half-way
  dino.gram_update_every = 390       and refreshed every 2.5 epochs of the demo (the recipes
                                     start after a first phase and refresh every 10k steps)
  eval.attention_images = 0          attention maps are DINO's ViT's

The other RoPE settings are dinov3/configs/ssl_default_config.yaml's (base 100, separate
coordinate normalisation, no shift or jitter). Not covered (docs/research.md): the Gram
teacher's higher-resolution crops, the loss-weight schedules, layer-wise lr decay.
"""

import pathlib
import runpy


def get_config():
    demo = runpy.run_path(str(pathlib.Path(__file__).with_name("demo.py")))
    c = demo["get_config"]()
    c.model.arch = "dinov3"
    c.model.num_register_tokens = 4
    c.model.layerscale_init = 1e-5
    c.model.ffn = "swiglu"
    c.model.rope_dtype = "fp32"
    c.model.rope_rescale_coords = 2.0
    c.dino.centering = "sinkhorn"
    c.dino.koleo_weight = 0.1
    c.dino.ibot_weight = 1.0
    c.dino.ibot_separate_head = True
    c.dino.gram_weight = 1.0
    c.dino.gram_start_step = 780
    c.dino.gram_update_every = 390
    c.eval.attention_images = 0
    return c
