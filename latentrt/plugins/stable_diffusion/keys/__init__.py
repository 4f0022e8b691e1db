"""Checkpoint key layouts: diffusers names -> the LDM names our networks use, per component."""
