"""Graph -> graph passes on pre-dispatch ATen; ``pipeline.py`` orders them."""
