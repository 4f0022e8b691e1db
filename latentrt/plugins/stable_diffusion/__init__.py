"""Stable Diffusion 1.x / 2.x / SDXL: networks, tokenizer, checkpoint keys and model families.

The networks use the LDM (CompVis) state-dict names, so a single-file checkpoint loads
by stripping its prefixes; diffusers folders are converted to those names in ``keys``.
"""
