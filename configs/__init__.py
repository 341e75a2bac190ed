"""The recipes, one module per run, each with a `get_config()`; installed as dino_jax.configs
and found by name (`--config=vit_small16`) or given by path."""
