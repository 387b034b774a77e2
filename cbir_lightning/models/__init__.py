"""Backbones, heads and the Lightning module.

Importing this package registers ``nasnetamobile`` with timm, so that ``timm.create_model("nasnetamobile")``
works wherever a backbone is built. ``import cbir_lightning`` alone stays free of torch and timm.
"""

from cbir_lightning.models import nasnet_mobile  # noqa: F401
