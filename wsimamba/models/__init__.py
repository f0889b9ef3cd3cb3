"""Models: slide-level MIL aggregators (`wsimamba.models.mil`), vision backbones, segmentation networks."""
