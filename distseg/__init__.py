"""distseg: label-efficient land-cover segmentation."""
__version__ = "0.1.0"
